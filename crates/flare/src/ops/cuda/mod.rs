//! CUDA plumbing shared by the ops' launchers (`ops/<op>/cuda.rs`): the row kernels' launch
//! planning and input checks ([`rows`]), the element-wise launch helpers ([`elementwise`]) and
//! the backward pass's gradient accumulation ([`grad_add`]).

pub(crate) mod elementwise;
pub(crate) mod grad_add;
pub(crate) mod multi_copy;
pub(crate) mod rows;
