//! `bitstack serve`: line-based generation that follows the memory the device has.

use crate::common::Res;
pub(crate) use bitstack_examples::serve::ServeArgs;

/// `bitstack serve`.
pub(crate) fn run(a: &ServeArgs) -> Res<()> {
    bitstack_examples::serve::serve(a)
}
