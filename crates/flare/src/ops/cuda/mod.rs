//! CUDA plumbing shared by the ops' launchers (`ops/<op>/cuda.rs`): the row kernels' launch
//! planning and input checks ([`rows`]) and the element-wise launch helpers ([`elementwise`]).

pub(crate) mod elementwise;
pub(crate) mod rows;
