//! # bitstack-cuda
//!
//! GPU restoration for BitStack weight stacks. **This build contains no GPU kernels**: they
//! were not written because no GPU was available to test them (see the project README). What
//! is here is the API surface engines program against, in the style of candle's dummy CUDA
//! backend: the same names as the real backend, every operation returning
//! [`CudaError::Unavailable`], so an engine can compile one code path and fall back to
//! `bitstack-core`'s CPU kernels at run time.
//!
//! ```
//! use bitstack_cuda::{CudaDevice, CudaError};
//! match CudaDevice::open(0) {
//!     Ok(_dev) => unreachable!("this build has no kernels"),
//!     Err(err) => println!("CPU fallback: {err}"),
//! }
//! ```
#![deny(missing_docs)]

use bitstack_core::WeightStack;
use thiserror::Error;

/// Errors of the GPU backend.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No usable GPU backend in this build or on this machine.
    #[error("CUDA backend unavailable: {0}")]
    Unavailable(String),
}

const WHY: &str = "bitstack-cuda was built without GPU kernels; use bitstack-core's CPU kernels";

/// A GPU device handle.
#[derive(Debug)]
pub struct CudaDevice {
    _private: (),
}

impl CudaDevice {
    /// Opens GPU `ordinal`. Always [`CudaError::Unavailable`] in this build.
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        Err(CudaError::Unavailable(format!("device {ordinal}: {WHY}")))
    }
    /// Whether any GPU can be used by this build (always `false` here).
    pub fn is_available() -> bool {
        false
    }
}

/// A weight stack's loaded prefix resident on a GPU.
#[derive(Debug)]
pub struct CudaStack {
    _private: (),
}

impl CudaStack {
    /// Uploads the loaded blocks of `stack` to `device`.
    pub fn upload(_device: &CudaDevice, _stack: &WeightStack) -> Result<Self, CudaError> {
        Err(CudaError::Unavailable(WHY.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_unavailable_instead_of_panicking() {
        assert!(!CudaDevice::is_available());
        let err = CudaDevice::open(0).unwrap_err();
        assert!(err.to_string().contains("unavailable"));
    }
}
