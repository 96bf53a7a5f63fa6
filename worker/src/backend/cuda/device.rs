//! Device plumbing of the CUDA backend: opening the GPU, loading the kernels (the carried
//! cache's machine code without NVRTC when it is warm, else NVRTC's output), buffers
//! addressed by raw device pointers, kernel launches and cuBLAS GEMMs.
//!
//! Everything runs on one stream with cudarc's event tracking switched off, so a buffer is a
//! plain device address and stream order is the only synchronization (frees are
//! stream-ordered too). Not for: model arithmetic (`backend.rs` strings these together).

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};

use super::{
    CudaError, CudaVersion, KERNEL_FILES, KernelImage, KernelTarget, Library, cache,
    check_libraries, compile_kernel, driver_cuda_version, find_headers, kernel_target,
    nvrtc_supported_archs, nvrtc_version,
};
use crate::backend::BackendError;

/// A CUDA driver or cuBLAS failure during a step: the context may be unusable afterwards.
pub(super) fn dev_err(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Device(format!("{what}: {e}"))
}

/// The kernel cache directory (compiled PTX and machine code, and the carried cache's
/// manifest): $LLMAPI_KERNEL_CACHE, else $XDG_CACHE_HOME/llmapi/kernels,
/// else ~/.cache/llmapi/kernels; None when none can be named.
pub fn kernel_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LLMAPI_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("llmapi").join("kernels"))
}

/// Number of CUDA devices, after checking that the driver library loads (0 when the driver
/// loads but sees no device).
pub fn device_count() -> Result<usize, CudaError> {
    check_libraries(&[Library::Driver])?;
    let n = CudaContext::device_count().map_err(|e| CudaError::Driver(e.to_string()))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Device-to-device copy bandwidth of GPU `ordinal` in GB/s, counting bytes read plus bytes
/// written (the HBM roofline's denominator): the best of 10 copies of a 1 GiB buffer.
pub fn copy_bandwidth_gbs(ordinal: usize) -> Result<f64, CudaError> {
    check_libraries(&[Library::Driver])?;
    let drv = |e: cudarc::driver::DriverError| CudaError::Driver(e.to_string());
    let ctx = CudaContext::new(ordinal).map_err(drv)?;
    let stream = ctx.default_stream();
    let n = 1usize << 28;
    let src = stream.alloc_zeros::<f32>(n).map_err(drv)?;
    let mut dst = stream.alloc_zeros::<f32>(n).map_err(drv)?;
    stream.memcpy_dtod(&src, &mut dst).map_err(drv)?;
    stream.synchronize().map_err(drv)?;
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = std::time::Instant::now();
        stream.memcpy_dtod(&src, &mut dst).map_err(drv)?;
        stream.synchronize().map_err(drv)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * 4) as f64 / best / 1e9)
}

/// One GPU: its context, the stream every call runs on, cuBLAS and the loaded kernels.
pub(super) struct Device {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: HashMap<String, CudaFunction>,
    /// Device name and compute capability, for logs.
    pub(super) describe: String,
}

impl Device {
    /// Opens device `ordinal` and loads every kernel: from the kernel cache's machine code when
    /// it is warm for this device (no NVRTC), else compiled by NVRTC (`open_kernels`).
    pub(super) fn open(ordinal: usize) -> Result<Self, CudaError> {
        check_libraries(&[Library::Driver, Library::Cublas])?;
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} requested but the driver sees {count} CUDA device(s)"
            )));
        }
        let drv = |e: cudarc::driver::DriverError| CudaError::Driver(e.to_string());
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        // SAFETY: the backend uses exactly one stream (below) for every allocation, copy,
        // launch and free, so stream order alone orders all uses of every buffer.
        unsafe { ctx.disable_event_tracking() };
        // A stream of its own: CUDA graphs cannot be captured on the legacy default stream.
        let stream = ctx.new_stream().map_err(drv)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let name = ctx.name().map_err(drv)?;
        let driver = driver_cuda_version()?;
        let kernels = open_kernels(&ctx, major * 10 + minor, driver)?;
        let blas = CudaBlas::new(Arc::clone(&stream))
            .map_err(|e| CudaError::Driver(format!("cuBLAS: {e}")))?;
        Ok(Self {
            ctx,
            stream,
            blas,
            kernels,
            describe: format!("{name} (sm_{major}{minor})"),
        })
    }

    /// (free, total) bytes of device memory.
    pub(super) fn mem_info(&self) -> Result<(usize, usize), BackendError> {
        self.ctx
            .mem_get_info()
            .map_err(|e| dev_err("cuMemGetInfo", e))
    }

    /// Copies `host` into a new device buffer.
    pub(super) fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, BackendError> {
        self.stream
            .clone_htod(host)
            .map_err(|e| dev_err("upload", e))
    }

    /// A zeroed device buffer of `len` elements.
    pub(super) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, BackendError> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(|e| dev_err(&format!("allocating {len} elements"), e))
    }

    /// Starts a launch of kernel `name`.
    pub(super) fn launch(&self, name: &str) -> Result<Launch<'_>, BackendError> {
        let f = self.kernels.get(name).ok_or_else(|| {
            BackendError::Device(format!("kernel {name} is not in the loaded modules"))
        })?;
        Ok(Launch {
            stream: &self.stream,
            func: f,
            args: Vec::new(),
        })
    }

    /// `out[rows x n] (f32) = x[rows x k] (bf16) . w[n x k]^T (bf16) + beta * out`, f32
    /// accumulation, where `w` is (address, n, k). Row-major buffers are column-major
    /// transposes for cuBLAS, so this is out^T = w^T' . x^T with w transposed.
    pub(super) fn gemm(
        &self,
        out: u64,
        x: u64,
        w: (u64, usize, usize),
        rows: usize,
        beta: f32,
    ) -> Result<(), BackendError> {
        let (w, n, k) = w;
        if rows == 0 {
            return Ok(());
        }
        let dim = |v: usize| {
            i32::try_from(v).map_err(|_| BackendError::Device(format!("GEMM size {v} too large")))
        };
        let (m_, n_, k_) = (dim(n)?, dim(rows)?, dim(k)?);
        let alpha = 1.0f32;
        // SAFETY: out, x and w are live device buffers of this context holding at least
        // rows*n f32, rows*k bf16 and n*k bf16 elements (the callers size them so); alpha and
        // beta are host scalars (cuBLAS's default pointer mode) that outlive the call.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m_,
                n_,
                k_,
                (&raw const alpha).cast::<c_void>(),
                w as usize as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k_,
                x as usize as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k_,
                (&raw const beta).cast::<c_void>(),
                out as usize as *mut c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                m_,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| dev_err("cublasGemmEx", e))
    }

    /// Waits for all queued work.
    pub(super) fn sync(&self) -> Result<(), BackendError> {
        self.stream
            .synchronize()
            .map_err(|e| dev_err("stream synchronize", e))
    }
}

/// The kernels of a device of architecture `device_arch` under a driver of CUDA `driver`,
/// loaded into `ctx`: the kernel cache's machine code when it is warm for this build and
/// device (`cache::warm_images`; NVRTC is then never loaded), else compiled by NVRTC.
fn open_kernels(
    ctx: &Arc<CudaContext>,
    device_arch: i32,
    driver: CudaVersion,
) -> Result<HashMap<String, CudaFunction>, CudaError> {
    let dir = kernel_cache_dir();
    let miss = match dir.as_deref() {
        None => "no cache directory can be named; set LLMAPI_KERNEL_CACHE".to_owned(),
        Some(d) => match cache::warm_images(d, KERNEL_FILES, device_arch, driver) {
            Ok(images) => {
                tracing::info!(
                    cache = %d.display(),
                    target = %format!("sm_{device_arch}"),
                    driver_cuda = %driver,
                    "loading the CUDA kernels' machine code from the kernel cache (no NVRTC)"
                );
                match load_images(ctx, images, &format!("sm_{device_arch}")) {
                    Ok(kernels) => return Ok(kernels),
                    Err(e) => {
                        tracing::warn!(error = %e, "the kernel cache's machine code does not load; compiling with NVRTC instead");
                        format!("its machine code does not load: {e}")
                    }
                }
            }
            Err(why) => why,
        },
    };
    let dir_text = dir
        .as_deref()
        .map_or_else(|| "<none>".to_owned(), |d| d.display().to_string());
    if let Some(cause) = nvrtc_unavailable() {
        return Err(CudaError::NoKernels {
            arch: device_arch,
            cache: dir_text,
            miss,
            cause,
            command: cache::build_command(device_arch, "DIR"),
        });
    }
    let include = find_headers()?;
    let nvrtc = nvrtc_version()?;
    let target = kernel_target(nvrtc, driver, &nvrtc_supported_archs()?, device_arch)?;
    tracing::info!(
        %nvrtc,
        driver_cuda = %driver,
        target = %target.arch(),
        cache = %dir_text,
        cache_miss = %miss,
        "compiling the CUDA kernels"
    );
    let compile_and_load = |target: KernelTarget| {
        let images = compile_images(target, nvrtc, &include, dir.as_deref())?;
        let cubins: Vec<(String, Vec<u8>)> = images
            .iter()
            .filter_map(|(k, image)| match image {
                KernelImage::Cubin(b) => Some((k.clone(), b.clone())),
                KernelImage::Ptx(_) => None,
            })
            .collect();
        let kernels = load_images(ctx, images, &target.arch())?;
        // Machine code that loaded is recorded, so the next open needs no NVRTC.
        if let (KernelTarget::Cubin(arch), Some(d)) = (target, dir.as_deref())
            && let Err(e) = cache::record(d, arch, nvrtc, KERNEL_FILES, &cubins)
        {
            tracing::warn!(error = %e, "the kernel cache's manifest was not updated; the next open compiles again");
        }
        Ok::<_, CudaError>(kernels)
    };
    match compile_and_load(target) {
        // Machine code that does not load (a first run on a new machine) is worth one retry
        // as PTX, which the driver compiles itself, when PTX of this NVRTC loads.
        Err(e @ CudaError::Driver(_))
            if matches!(target, KernelTarget::Cubin(_)) && nvrtc <= driver =>
        {
            let ptx = KernelTarget::Ptx(device_arch);
            tracing::warn!(error = %e, retry = %ptx.arch(), "the kernels' machine code does not load; compiling PTX instead");
            compile_and_load(ptx)
        }
        other => other,
    }
}

/// Why NVRTC cannot compile the kernels here (the library or the headers are missing), in a
/// few words; None when it can. Loads libnvrtc to check, so it runs only on a cache miss.
pub(super) fn nvrtc_unavailable() -> Option<String> {
    match check_libraries(&[Library::Nvrtc]).and_then(|()| find_headers()) {
        Ok(_) => None,
        Err(CudaError::LibraryMissing { library }) => Some(format!("{library} cannot be loaded")),
        Err(CudaError::NoHeaders { searched }) => Some(format!(
            "no cuda_bf16.h in {searched:?} (LLMAPI_CUDA_INCLUDE)"
        )),
        Err(e) => Some(e.to_string()),
    }
}

/// The architecture (10 x major + minor) of device `ordinal`, without creating a context.
pub fn device_arch(ordinal: usize) -> Result<i32, CudaError> {
    use cudarc::driver::{result, sys::CUdevice_attribute as A};
    check_libraries(&[Library::Driver])?;
    let drv = |e: cudarc::driver::DriverError| CudaError::Driver(e.to_string());
    result::init().map_err(drv)?;
    let ordinal = i32::try_from(ordinal)
        .map_err(|_| CudaError::NoDevice(format!("device {ordinal} is out of range")))?;
    let dev = result::device::get(ordinal).map_err(drv)?;
    // SAFETY: `dev` was returned by cuDeviceGet just above.
    let (major, minor) = unsafe {
        (
            result::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            result::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        )
    };
    Ok(major.map_err(drv)? * 10 + minor.map_err(drv)?)
}

/// Checks, before any context is made, that the kernels of device `ordinal` can be had: the
/// kernel cache is warm for its architecture (by the manifest), or NVRTC and the CUDA
/// headers are here to compile them.
pub fn check_kernels_available(ordinal: usize) -> Result<(), CudaError> {
    let arch = device_arch(ordinal)?;
    let driver = driver_cuda_version()?;
    let dir = kernel_cache_dir();
    let miss = match dir.as_deref() {
        None => "no cache directory can be named; set LLMAPI_KERNEL_CACHE".to_owned(),
        Some(d) => match cache::Manifest::load(d) {
            Ok(m) => match cache::plan_kernels(m.as_ref(), KERNEL_FILES, arch, driver) {
                cache::CachePlan::Warm(_) => return Ok(()),
                cache::CachePlan::Miss(why) => why,
            },
            Err(why) => why,
        },
    };
    match nvrtc_unavailable() {
        None => Ok(()),
        Some(cause) => Err(CudaError::NoKernels {
            arch,
            cache: dir
                .as_deref()
                .map_or_else(|| "<none>".to_owned(), |d| d.display().to_string()),
            miss,
            cause,
            command: cache::build_command(arch, "DIR"),
        }),
    }
}

/// Compiles (or reads from the per-file cache) every kernel file for `target`.
fn compile_images(
    target: KernelTarget,
    nvrtc: CudaVersion,
    include: &std::path::Path,
    cache: Option<&std::path::Path>,
) -> Result<Vec<(String, KernelImage)>, CudaError> {
    KERNEL_FILES
        .iter()
        .map(|(file, source)| {
            compile_kernel(file, source, target, nvrtc, include, cache)
                .map(|image| ((*file).to_owned(), image))
        })
        .collect()
}

/// Loads every kernel file's image (compiled for `arch`) into `ctx`, with its functions.
fn load_images(
    ctx: &Arc<CudaContext>,
    images: Vec<(String, KernelImage)>,
    arch: &str,
) -> Result<HashMap<String, CudaFunction>, CudaError> {
    let mut kernels = HashMap::new();
    for (file, image) in images {
        let source = KERNEL_FILES
            .iter()
            .find(|(f, _)| *f == file)
            .map(|(_, s)| *s)
            .ok_or_else(|| {
                CudaError::Driver(format!("{file}.cu is not a kernel file of this build"))
            })?;
        let load = |e: cudarc::driver::DriverError| {
            CudaError::Driver(format!("loading {file}.cu compiled for {arch}: {e}"))
        };
        let module = ctx.load_module(image.into_module()).map_err(load)?;
        for k in super::kernel_names(source) {
            let f = module.load_function(&k).map_err(load)?;
            kernels.insert(k, f);
        }
    }
    Ok(kernels)
}

/// The device address of a buffer (event tracking is off, so the guard cudarc returns does
/// nothing and is dropped at once).
pub(super) fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _guard) = s.device_ptr(stream);
    p
}

/// Kernel arguments by value, pushed in the order of the kernel's parameters.
pub(super) enum Arg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    F32(f32),
    Usize(usize),
}

/// One kernel launch being assembled.
pub(super) struct Launch<'a> {
    stream: &'a Arc<CudaStream>,
    func: &'a CudaFunction,
    args: Vec<Arg>,
}

impl Launch<'_> {
    /// A device address argument.
    pub(super) fn ptr(mut self, p: u64) -> Self {
        self.args.push(Arg::Ptr(p));
        self
    }

    /// An `int` argument (sizes are checked to fit by the caller's `int_arg`).
    pub(super) fn i32(mut self, v: i32) -> Self {
        self.args.push(Arg::I32(v));
        self
    }

    /// An `unsigned int` argument.
    pub(super) fn u32(mut self, v: u32) -> Self {
        self.args.push(Arg::U32(v));
        self
    }

    /// A `float` argument.
    pub(super) fn f32(mut self, v: f32) -> Self {
        self.args.push(Arg::F32(v));
        self
    }

    /// A `size_t` argument.
    pub(super) fn usize(mut self, v: usize) -> Self {
        self.args.push(Arg::Usize(v));
        self
    }

    /// Queues the kernel on the stream with `grid` x `block` threads and `smem` bytes of
    /// dynamic shared memory.
    pub(super) fn run(
        self,
        grid: (u32, u32),
        block: u32,
        smem: u32,
        what: &str,
    ) -> Result<(), BackendError> {
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (grid.0, grid.1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem,
        };
        let mut b = self.stream.launch_builder(self.func);
        for a in &self.args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::Usize(v) => b.arg(v),
            };
        }
        // SAFETY: each kernel's arguments are pushed in its parameter order with its C types
        // (pointers as 64-bit device addresses, int, unsigned int, float, size_t), and every address points
        // into a live buffer large enough for the grid (the caller's invariant); `self.args`
        // outlives the launch call, which copies the values.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| dev_err(&format!("launching {what}"), e))
    }
}

/// A device buffer that grows on demand (contents are not kept when it grows).
pub(super) struct Scratch<T> {
    buf: Option<CudaSlice<T>>,
    /// How many times the buffer moved (a captured CUDA graph holds its old address).
    moves: u64,
}

impl<T: DeviceRepr + ValidAsZeroBits> Scratch<T> {
    pub(super) fn new() -> Self {
        Self {
            buf: None,
            moves: 0,
        }
    }

    /// The address of a buffer of at least `len` elements.
    pub(super) fn at_least(&mut self, dev: &Device, len: usize) -> Result<u64, BackendError> {
        if self.buf.as_ref().is_none_or(|b| b.len() < len) {
            self.buf = None;
            self.buf = Some(dev.zeros(len)?);
            self.moves += 1;
        }
        match &self.buf {
            Some(b) => Ok(ptr(b, &dev.stream)),
            None => Err(BackendError::Device("scratch buffer missing".into())),
        }
    }

    /// Copies `host` to the start of the buffer (which must hold at least `host.len()`).
    pub(super) fn write(&mut self, dev: &Device, host: &[T]) -> Result<(), BackendError> {
        let Some(b) = self.buf.as_mut().filter(|b| b.len() >= host.len()) else {
            return Err(BackendError::Device(format!(
                "scratch buffer smaller than the {} elements written",
                host.len()
            )));
        };
        let mut view = b.slice_mut(0..host.len());
        dev.stream
            .memcpy_htod(host, &mut view)
            .map_err(|e| dev_err("host-to-device copy", e))
    }

    /// Zeroes the first `len` elements (stream-ordered), growing the buffer if needed.
    pub(super) fn zero(&mut self, dev: &Device, len: usize) -> Result<(), BackendError> {
        self.at_least(dev, len)?;
        let Some(b) = self.buf.as_mut() else {
            return Err(BackendError::Device("scratch buffer missing".into()));
        };
        let mut view = b.slice_mut(0..len);
        dev.stream
            .memset_zeros(&mut view)
            .map_err(|e| dev_err("memset", e))
    }

    /// Copies the first `host.len()` elements to `host`, waiting for the stream.
    pub(super) fn read(&self, dev: &Device, host: &mut [T]) -> Result<(), BackendError> {
        let Some(b) = self.buf.as_ref().filter(|b| b.len() >= host.len()) else {
            return Err(BackendError::Device(format!(
                "scratch buffer smaller than the {} elements read",
                host.len()
            )));
        };
        let view = b.slice(0..host.len());
        dev.stream
            .memcpy_dtoh(&view, host)
            .map_err(|e| dev_err("device-to-host copy", e))?;
        dev.sync()
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.num_bytes())
    }

    /// How many times the buffer was (re)allocated.
    pub(super) fn moves(&self) -> u64 {
        self.moves
    }
}

/// Grid size of a grid-stride loop over `n` elements with 256-thread blocks.
pub(super) fn stride_grid(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 65_535) as u32
}
