//! `bitstack compare`: the paper's Table 1 (RTN / GPTQ / AWQ against BitStack at equal memory).

use crate::common::Res;
pub(crate) use bitstack_examples::compare::CompareArgs;

/// `bitstack compare`.
pub(crate) fn run(a: &CompareArgs) -> Res<()> {
    bitstack_examples::compare::run_cli(a)
}
