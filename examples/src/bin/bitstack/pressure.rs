//! `bitstack pressure-demo`: generation under a scripted schedule of available memory.

use crate::common::Res;
pub(crate) use bitstack_examples::serve::PressureArgs;

/// `bitstack pressure-demo`.
pub(crate) fn run(a: &PressureArgs) -> Res<()> {
    bitstack_examples::serve::pressure_demo(a)
}
