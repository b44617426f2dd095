//! The op's names and the ignored target id, shared by its public function, CPU and CUDA sides.

pub(super) const OP: &str = "cross_entropy";
pub(super) const OP_BWD: &str = "cross_entropy_bwd";
/// The ignore index transformers uses (`-100` as a u32 would not fit; flare uses `u32::MAX`).
pub const IGNORE_INDEX: u32 = u32::MAX;
