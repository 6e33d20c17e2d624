//! NCCL as a [`Collective`] (cargo feature `nccl`): the gradients of a multi-GPU run summed
//! with `ncclAllReduce` in device memory, on the stream candle runs the training on, so the
//! sum is ordered after the backward pass and before the update without a host round trip.
//!
//! NCCL collectives have no timeout: a rank that dies inside one (a crashed process, a lost
//! node) leaves the others waiting until the job is killed, as with PyTorch's NCCL backend
//! without its watchdog. Failures that happen outside a collective are agreed on first
//! ([`super::parallel::agree`]), so an error on one rank ends every rank.
//!
//! The safe NCCL wrapper is cudarc's (`cudarc::nccl`, through candle's `nccl` feature);
//! this file only maps our [`Collective`] contract onto it and moves candle's device
//! buffers in and out (candle exposes a tensor's `CudaSlice` to in-place custom ops).

use std::sync::{Mutex, MutexGuard};

use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, Device, InplaceOp1, Layout, Tensor};

use super::parallel::Collective;
use crate::{Error, Result};

/// A `Comm` that may move to the thread of its rank.
struct SendComm(Comm);

// SAFETY: cudarc's `Comm` is a NCCL communicator handle plus an `Arc<CudaStream>`; it is
// `!Send` only because the handle is a raw pointer. NCCL allows a communicator to be used
// from any thread as long as calls on it are not concurrent: `Nccl` keeps it behind a mutex,
// and one rank's thread is its only user.
unsafe impl Send for SendComm {}

/// One rank of an NCCL communicator, bound to one GPU and the stream candle computes on.
pub struct Nccl {
    comm: Mutex<SendComm>,
    rank: usize,
    world: usize,
}

fn nccl_error(
    what: &str,
) -> impl Fn(candle_core::cuda_backend::cudarc::nccl::result::NcclError) -> Error + '_ {
    move |e| {
        Error::Config(format!(
            "NCCL {what} failed: {e:?}; check that every GPU is visible (`nvidia-smi`) and libnccl.so.2 is on the loader path (NCCL_DEBUG=INFO says more)"
        ))
    }
}

fn driver_error(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> Error {
    Error::Config(format!("CUDA copy for an NCCL collective failed: {e}"))
}

impl Nccl {
    /// One communicator per device, all in this process (`ncclCommInitAll`), in the order
    /// of `devices` (rank `i` on `devices[i]`), each on the device's candle stream.
    ///
    /// # Errors
    /// [`Error::Config`] when a device is not a CUDA device, a GPU appears twice (NCCL
    /// refuses it) or NCCL fails to initialise.
    pub fn group(devices: &[Device]) -> Result<Vec<Nccl>> {
        let mut streams = Vec::with_capacity(devices.len());
        let mut ordinals = Vec::with_capacity(devices.len());
        for device in devices {
            let cuda = device.as_cuda_device().map_err(|_| {
                Error::Config(format!(
                    "NCCL runs on CUDA devices; `{device:?}` is not one"
                ))
            })?;
            let stream = cuda.cuda_stream();
            let ordinal = stream.context().ordinal();
            if ordinals.contains(&ordinal) {
                return Err(Error::Config(format!(
                    "cuda:{ordinal} is listed twice in `--devices`; NCCL needs one rank per GPU"
                )));
            }
            ordinals.push(ordinal);
            streams.push(stream);
        }
        let world = streams.len();
        let comms = Comm::from_devices(streams).map_err(nccl_error("ncclCommInitAll"))?;
        Ok(comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| Nccl {
                comm: Mutex::new(SendComm(comm)),
                rank,
                world,
            })
            .collect())
    }

    /// A new NCCL unique id (`ncclGetUniqueId`): rank 0 of a multi-process run makes it and
    /// hands its 128 bytes to the other ranks, which pass them to [`Nccl::join`].
    ///
    /// # Errors
    /// [`Error::Config`] when NCCL fails.
    pub fn unique_id() -> Result<[u8; 128]> {
        let id = Id::new().map_err(nccl_error("ncclGetUniqueId"))?;
        Ok(id.internal().map(|b| b as u8))
    }

    /// This process's rank of a multi-process group (`ncclCommInitRank`) on `device`'s
    /// stream; blocks until all `world` ranks have joined with the same `id`.
    ///
    /// # Errors
    /// [`Error::Config`] when `device` is not a CUDA device or NCCL fails.
    pub fn join(device: &Device, rank: usize, world: usize, id: [u8; 128]) -> Result<Nccl> {
        let cuda = device.as_cuda_device().map_err(|_| {
            Error::Config(format!(
                "NCCL runs on CUDA devices; `{device:?}` is not one"
            ))
        })?;
        let id = Id::uninit(id.map(|b| b as core::ffi::c_char));
        let stream = cuda.cuda_stream();
        // ncclCommInitRank takes the calling thread's current device.
        stream.context().bind_to_thread().map_err(driver_error)?;
        let comm =
            Comm::from_rank(stream, rank, world, id).map_err(nccl_error("ncclCommInitRank"))?;
        Ok(Nccl {
            comm: Mutex::new(SendComm(comm)),
            rank,
            world,
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, SendComm>> {
        self.comm.lock().map_err(|_| {
            Error::Config(format!(
                "NCCL rank {}: a previous collective panicked",
                self.rank
            ))
        })
    }

    /// Uploads `values`, runs `op` on the device copy, downloads the result into `values`.
    fn through_device<T>(
        &self,
        values: &mut [T],
        op: impl FnOnce(&Comm, &mut CudaSlice<T>) -> Result<()>,
    ) -> Result<()>
    where
        T: candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        let guard = self.lock()?;
        let stream = guard.0.stream();
        let mut buffer = stream.clone_htod(values).map_err(driver_error)?;
        op(&guard.0, &mut buffer)?;
        stream.memcpy_dtoh(&buffer, values).map_err(driver_error)?;
        stream.synchronize().map_err(driver_error)?;
        Ok(())
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        self.through_device(values, |comm, buffer| {
            comm.all_reduce_in_place(buffer, &ReduceOp::Sum)
                .map(drop)
                .map_err(nccl_error("ncclAllReduce (f32)"))
        })
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.through_device(values, |comm, buffer| {
            comm.all_reduce_in_place(buffer, &ReduceOp::Sum)
                .map(drop)
                .map_err(nccl_error("ncclAllReduce (f64)"))
        })
    }

    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()> {
        let root = i32::try_from(root)
            .ok()
            .filter(|&r| (r as usize) < self.world)
            .ok_or_else(|| {
                Error::Config(format!(
                    "broadcast root {root} is not a rank of this group of {}",
                    self.world
                ))
            })?;
        self.through_device(values, |comm, buffer| {
            comm.broadcast_in_place(buffer, root)
                .map(drop)
                .map_err(nccl_error("ncclBroadcast"))
        })
    }

    /// In device memory: `values`' own storage summed in place by `ncclAllReduce` on the
    /// communicator's stream (candle's), no host copy and no allocation (a non-contiguous
    /// tensor is first made contiguous).
    fn all_reduce_sum_tensor(&self, values: Tensor) -> Result<Tensor> {
        let shape = values.shape().clone();
        let flat = values.contiguous()?.flatten_all()?;
        let guard = self.lock()?;
        flat.inplace_op1(&AllReduce { comm: &guard.0 })?;
        drop(guard);
        Ok(flat.reshape(shape)?)
    }
}

/// `ncclAllReduce(sum)` in place on a contiguous f32 CUDA tensor, as a candle custom op
/// (how candle hands out a tensor's device buffer).
struct AllReduce<'a> {
    comm: &'a Comm,
}

impl InplaceOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL sums CUDA memory; this tensor is on the CPU")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("NCCL all-reduce needs a contiguous tensor at offset 0");
        }
        let count = layout.shape().elem_count();
        self.comm
            .context()
            .bind_to_thread()
            .map_err(|e| candle_core::Error::Msg(format!("CUDA context: {e}")))?;
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        if slice.len() != count {
            candle_core::bail!(
                "NCCL all-reduce: the buffer holds {} values, the tensor {count}",
                slice.len()
            );
        }
        self.comm
            .all_reduce_in_place(slice, &ReduceOp::Sum)
            .map(drop)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce (f32) failed: {e:?}")))
    }
}
