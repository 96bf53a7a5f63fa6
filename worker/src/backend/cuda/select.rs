//! Which backend `--backend` resolves to, and building the CUDA one from engine settings.
//!
//! `cuda` demands a usable GPU (driver, device, cuBLAS, and the kernels: a kernel cache warm
//! for the device, else NVRTC and the CUDA headers) and fails with what to install otherwise; `auto` (and trtllm-serve's `pytorch`) takes CUDA when all of it
//! is there, else the CPU, and logs which and why.

use llmapi_common::args::Backend as Requested;

use super::graphs::GraphSizes;
use super::{
    CudaBackend, CudaError, CudaSettings, Library, check_kernels_available, check_libraries,
};
use crate::dist::Communicator;
use crate::engine::{EngineConfig, EngineError};
use crate::model::ModelWeights;

/// The backend a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The CPU backend.
    Cpu,
    /// The CUDA backend on device 0.
    Cuda,
}

/// Checks everything the CUDA backend needs before it makes a context: the driver and cuBLAS
/// load, the driver sees a device, and device 0's kernels can be had (the kernel cache is warm
/// for its architecture, else NVRTC and its headers are here; NVRTC is not loaded when the
/// cache is warm).
pub fn probe() -> Result<usize, CudaError> {
    check_libraries(&[Library::Driver, Library::Cublas])?;
    let n = super::device_count()?;
    if n == 0 {
        return Err(CudaError::NoDevice(
            "the NVIDIA driver loads but sees no device".into(),
        ));
    }
    check_kernels_available(0)?;
    Ok(n)
}

/// Resolves `requested` on this machine (see the module doc).
pub fn resolve(requested: Requested) -> Result<Choice, CudaError> {
    resolve_with(requested, probe)
}

/// `resolve` over any probe (tests pass a probe that fails or succeeds on demand).
pub fn resolve_with(
    requested: Requested,
    probe: impl FnOnce() -> Result<usize, CudaError>,
) -> Result<Choice, CudaError> {
    match requested {
        Requested::Cpu => Ok(Choice::Cpu),
        Requested::Cuda => probe().map(|_| Choice::Cuda),
        Requested::Auto | Requested::Pytorch => match probe() {
            Ok(n) => {
                tracing::info!(
                    devices = n,
                    "backend auto: a CUDA device is usable, using cuda"
                );
                Ok(Choice::Cuda)
            }
            Err(e) => {
                tracing::info!(reason = %e, "backend auto: no usable CUDA device, using cpu");
                Ok(Choice::Cpu)
            }
        },
    }
}

/// Whether the CUDA backend runs `weights` with `cfg` (checked without a GPU): dtype auto and
/// bfloat16 run bf16 GEMMs, float32 and float16 are refused, and so is what
/// `CudaBackend::check_supported` refuses.
pub fn supports(weights: &ModelWeights, cfg: &EngineConfig) -> Result<(), EngineError> {
    use llmapi_common::args::ModelDtype;
    if matches!(cfg.dtype, ModelDtype::Float32 | ModelDtype::Float16) {
        return Err(EngineError::InvalidConfig(format!(
            "--dtype {:?}: the CUDA backend computes with bf16 weights and f32 accumulation; use --dtype auto or bfloat16, or --backend cpu for float32",
            cfg.dtype
        )));
    }
    CudaBackend::check_supported(weights, cfg.kv_dtype)
        .map(|_| ())
        .map_err(|e| EngineError::InvalidConfig(e.to_string()))
}

fn settings(cfg: &EngineConfig, weights: &ModelWeights, device: usize) -> CudaSettings {
    CudaSettings {
        device,
        max_num_tokens: cfg.max_num_tokens,
        max_batch_size: cfg.max_batch_size,
        kv_dtype: cfg.kv_dtype,
        max_seq_len: cfg
            .max_seq_len
            .unwrap_or(weights.config.max_position_embeddings),
        cuda_graphs: GraphSizes::from_config(cfg.cuda_graph_config.as_ref(), cfg.max_batch_size),
    }
}

/// A CUDA backend for a whole model with the engine's settings (see `supports`), on the
/// GPU of the engine's `gpu_slot` (`slot_gpu`).
pub fn cuda_backend(weights: ModelWeights, cfg: &EngineConfig) -> Result<CudaBackend, EngineError> {
    supports(&weights, cfg)?;
    // Slot 0 is GPU 0 whatever the count, so a lone engine does not ask the driver first.
    let gpu = match cfg.gpu_slot {
        0 => 0,
        slot => {
            let devices = super::device_count().map_err(|e| EngineError::Backend(e.to_string()))?;
            slot_gpu(slot, devices)
        }
    };
    if gpu != 0 {
        tracing::info!(gpu_slot = cfg.gpu_slot, gpu, "engine on CUDA");
    }
    let s = settings(cfg, &weights, gpu);
    CudaBackend::new(weights, &s).map_err(|e| EngineError::Backend(e.to_string()))
}

/// The GPU of the engine in local slot `slot` (its rank among the tasks on its node) on a
/// node with `devices` visible GPUs: `slot` modulo `devices`. Tasks of one node take
/// consecutive GPUs, whether they are the ranks of one tensor-parallel group or of several
/// groups or replicas; with Slurm binding one GPU to each task (`devices` = 1) every task
/// takes its only GPU.
pub fn slot_gpu(slot: usize, devices: usize) -> usize {
    slot % devices.max(1)
}

/// A CUDA backend for one rank's shard on its GPU (`slot_gpu` of the engine's `gpu_slot`), with the group's
/// collectives through `comm` (NCCL's device all-reduce when `comm` has it).
pub fn cuda_backend_in_group(
    weights: ModelWeights,
    cfg: &EngineConfig,
    comm: Box<dyn Communicator>,
) -> Result<CudaBackend, EngineError> {
    supports(&weights, cfg)?;
    let devices = super::device_count().map_err(|e| EngineError::Backend(e.to_string()))?;
    let gpu = slot_gpu(cfg.gpu_slot, devices);
    tracing::info!(
        tp_rank = weights.shard.tp_rank,
        gpu_slot = cfg.gpu_slot,
        gpu,
        devices,
        device_collectives = comm.moves_device_memory(),
        "tensor-parallel rank on CUDA"
    );
    let s = settings(cfg, &weights, gpu);
    CudaBackend::new_sharded(weights, comm, &s).map_err(|e| EngineError::Backend(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missing() -> Result<usize, CudaError> {
        Err(CudaError::LibraryMissing { library: "libcuda" })
    }

    #[test]
    fn cuda_without_a_gpu_is_an_error_naming_the_fix() {
        let e = resolve_with(Requested::Cuda, missing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("libcuda") && e.contains("--backend cpu"), "{e}");
    }

    #[test]
    fn auto_and_pytorch_fall_back_to_cpu_without_a_gpu() {
        assert_eq!(resolve_with(Requested::Auto, missing).unwrap(), Choice::Cpu);
        assert_eq!(
            resolve_with(Requested::Pytorch, missing).unwrap(),
            Choice::Cpu
        );
    }

    #[test]
    fn auto_picks_cuda_when_the_probe_passes() {
        assert_eq!(
            resolve_with(Requested::Auto, || Ok(1)).unwrap(),
            Choice::Cuda
        );
        assert_eq!(
            resolve_with(Requested::Cuda, || Ok(1)).unwrap(),
            Choice::Cuda
        );
    }

    #[test]
    fn local_slots_take_consecutive_gpus() {
        // Four tasks on a node with two GPUs (e.g. two TP=2 groups): two per GPU.
        assert_eq!(
            (0..4).map(|r| slot_gpu(r, 2)).collect::<Vec<_>>(),
            vec![0, 1, 0, 1]
        );
        // Eight tasks on an eight-GPU node, whatever groups they form: one each.
        assert_eq!(
            (0..8).map(|r| slot_gpu(r, 8)).collect::<Vec<_>>(),
            (0..8).collect::<Vec<_>>()
        );
        // Slurm binding one GPU per task: every task sees device 0 only.
        assert_eq!(slot_gpu(5, 1), 0);
        assert_eq!(slot_gpu(1, 0), 0);
    }

    #[test]
    fn cpu_never_probes() {
        let probe = || -> Result<usize, CudaError> { panic!("cpu must not probe") };
        assert_eq!(resolve_with(Requested::Cpu, probe).unwrap(), Choice::Cpu);
    }

    #[test]
    fn no_device_error_says_to_use_cpu() {
        let e = resolve_with(Requested::Cuda, || {
            Err(CudaError::NoDevice(
                "the NVIDIA driver loads but sees no device".into(),
            ))
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sees no device") && e.contains("--backend cpu"),
            "{e}"
        );
    }
}
