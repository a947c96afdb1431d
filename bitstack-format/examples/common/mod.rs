//! Set-up shared by the examples (a module, not an example target of its own).

use bitstack_core::{FactorDtype, StackMeta};
use bitstack_format::FileDescription;

/// The description of a file of `weights` stacks named `name(w)`, each `rows × cols` with
/// `levels` f16 blocks of rank `rank` and no activation scale: the synthetic model both
/// benchmarks write.
pub fn f16_description(
    weights: usize,
    name: impl Fn(usize) -> String,
    (rows, cols): (usize, usize),
    rank: usize,
    levels: u16,
) -> FileDescription {
    let stacks: Vec<StackMeta> = (0..weights)
        .map(|w| StackMeta {
            name: name(w),
            rows,
            cols,
            rank,
            levels,
            scale: None,
            factors: FactorDtype::F16,
        })
        .collect();
    FileDescription {
        stacks,
        ..Default::default()
    }
}
