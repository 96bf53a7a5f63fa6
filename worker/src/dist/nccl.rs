//! NCCL collectives for a group whose ranks compute on GPUs (one GPU per rank: GPU = local rank).
//!
//! cudarc loads libnccl dynamically and panics when it is absent, so `check_nccl_libraries`
//! runs before any NCCL call and turns absence into an error that says what to install.
//! Bootstrap: the group first forms its TCP ring (`dist::tcp`); every rank reports over it
//! whether NCCL and its GPU are usable, rank 0 creates the NCCL unique id and broadcasts it over
//! the ring, and every rank then initialises its NCCL communicator on its GPU.
//!
//! Bounded waits: the communicator is created non-blocking (`ncclCommInitRankConfig` with
//! `blocking = 0`); initialisation and every collective are polled (`ncclCommGetAsyncError`
//! and a CUDA event) against a deadline, and on an error or a timeout the communicator is
//! aborted (`ncclCommAbort`). NCCL does not say which peer failed, so the TCP ring, kept open
//! beside NCCL, is then probed with a barrier: a dead rank shows there as a closed connection
//! or a silent peer, and that error, naming the rank, is returned.

use std::ffi::{CStr, c_void};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::NcclType;
use cudarc::nccl::sys;

use super::{CommError, Communicator};
use crate::backend::cuda::{Library, check_libraries};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// Time limits of an NCCL communicator.
#[derive(Debug, Clone, Copy)]
pub struct NcclTimeouts {
    /// How long `ncclCommInitRankConfig` may take (every rank must reach it).
    pub init: Duration,
    /// How long one collective may take before the communicator is aborted.
    pub op: Duration,
}

impl Default for NcclTimeouts {
    fn default() -> Self {
        Self {
            init: Duration::from_secs(120),
            op: Duration::from_secs(30),
        }
    }
}

/// Checks that libnccl and the CUDA driver can be loaded, without calling into them. The error
/// says what to install; when only `libnccl.so.2` is found (pip's nvidia-nccl packages and
/// Debian's libnccl2 ship no unversioned name, and cudarc looks for `libnccl.so`), it says so.
pub fn check_nccl_libraries() -> Result<(), String> {
    check_libraries(&[Library::Nccl, Library::Driver]).map_err(|e| {
        let mut message = e.to_string();
        if !nccl_loadable() {
            message.push_str(&versioned_nccl_hint());
        }
        message
    })
}

fn nccl_loadable() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names; calls nothing in it.
    unsafe { sys::is_culib_present() }
}

/// A hint naming a `libnccl.so.2` on the loader path that cudarc does not try, if there is one.
fn versioned_nccl_hint() -> String {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    dirs.extend(
        ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/lib"]
            .iter()
            .map(std::path::PathBuf::from),
    );
    match dirs
        .iter()
        .map(|d| d.join("libnccl.so.2"))
        .find(|f| f.is_file())
    {
        Some(file) => format!(
            ". Found {}, which cudarc does not look for (it tries libnccl.so): make a directory holding a symlink libnccl.so -> that file and put it first on LD_LIBRARY_PATH",
            file.display()
        ),
        None => String::from(
            ". NCCL ships in pip's nvidia-nccl-cu12 package and Debian/Ubuntu's libnccl2 (plus libnccl-dev for the libnccl.so name)",
        ),
    }
}

/// Agrees on an NCCL unique id over the group's host communicator.
///
/// Every rank passes whether it can run NCCL (`ready`); if any cannot, every rank returns the
/// same error naming those ranks, so no rank waits for a peer that will never initialise.
/// Otherwise rank 0 calls `make_id` and broadcasts the id; a failure there is also broadcast,
/// so followers fail naming rank 0 instead of timing out. `make_id` is called on rank 0 only.
pub fn share_unique_id(
    host: &mut dyn Communicator,
    ready: Result<(), String>,
    make_id: impl FnOnce() -> Result<[u8; ID_BYTES], String>,
) -> Result<[u8; ID_BYTES], CommError> {
    let (rank, world) = (host.rank(), host.world_size());
    let mut not_ready = vec![0.0f32; world];
    if ready.is_err() {
        not_ready[rank] = 1.0;
    }
    host.all_reduce_sum(&mut not_ready)?;
    let missing: Vec<usize> = (0..world).filter(|r| not_ready[*r] > 0.0).collect();
    if !missing.is_empty() {
        let own = match &ready {
            Err(e) => format!("; this rank: {e}"),
            Ok(()) => String::new(),
        };
        return Err(CommError::Nccl {
            rank,
            message: format!("ranks {missing:?} cannot run NCCL{own}"),
        });
    }
    // Byte 0: 1 when rank 0 made an id (bytes 1..), 0 when it failed (bytes 1.. hold why).
    let mut msg = [0u8; 1 + ID_BYTES];
    if rank == 0 {
        match make_id() {
            Ok(id) => {
                msg[0] = 1;
                msg[1..].copy_from_slice(&id);
            }
            Err(e) => {
                let text = e.as_bytes();
                let n = text.len().min(ID_BYTES);
                msg[1..1 + n].copy_from_slice(&text[..n]);
            }
        }
    }
    host.broadcast(&mut msg, 0)?;
    if msg[0] != 1 {
        let why = String::from_utf8_lossy(&msg[1..]);
        return Err(CommError::Nccl {
            rank,
            message: format!(
                "rank 0 could not create the NCCL unique id: {}",
                why.trim_end_matches('\0')
            ),
        });
    }
    let mut id = [0u8; ID_BYTES];
    id.copy_from_slice(&msg[1..]);
    Ok(id)
}

/// A fresh NCCL unique id from libnccl (call `check_nccl_libraries` first).
pub fn new_unique_id() -> Result<[u8; ID_BYTES], String> {
    if !nccl_loadable() {
        return Err(format!("libnccl cannot be loaded{}", versioned_nccl_hint()));
    }
    let id = cudarc::nccl::result::get_uniqueid().map_err(|e| nccl_error_text(e.0))?;
    let mut out = [0u8; ID_BYTES];
    for (dst, src) in out.iter_mut().zip(id.internal.iter()) {
        *dst = *src as u8;
    }
    Ok(out)
}

/// The version of the loaded libnccl as NCCL encodes it (e.g. 22703 for 2.27.3).
pub fn nccl_version() -> Result<i32, String> {
    if !nccl_loadable() {
        return Err(format!("libnccl cannot be loaded{}", versioned_nccl_hint()));
    }
    cudarc::nccl::result::get_nccl_version().map_err(|e| nccl_error_text(e.0))
}

fn nccl_error_text(r: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any result code.
    let text = unsafe { CStr::from_ptr(sys::ncclGetErrorString(r)) };
    format!("{r:?} ({})", text.to_string_lossy())
}

/// Whether this machine can run NCCL on GPU `local_gpu` (libraries, driver, device present).
pub fn local_readiness(local_gpu: usize) -> Result<(), String> {
    check_nccl_libraries()?;
    // Non-blocking init (ncclCommInitRankConfig) came in 2.14; cudarc would panic on the
    // missing symbol of an older library.
    let version = nccl_version()?;
    if version < 21400 {
        return Err(format!(
            "libnccl reports version code {version}, older than 2.14 (21400), which non-blocking initialisation needs; install a newer NCCL"
        ));
    }
    let n = CudaContext::device_count().map_err(|e| format!("the CUDA driver fails: {e}"))?;
    let n = usize::try_from(n).unwrap_or(0);
    if local_gpu >= n {
        return Err(format!(
            "this rank uses GPU {local_gpu} (its local rank) but the driver sees {n} GPU(s); start at most {n} ranks per node or make more GPUs visible"
        ));
    }
    Ok(())
}

/// An NCCL communicator over the ranks of one group, each on its own GPU, with the group's
/// host communicator (the TCP ring) kept beside it to name a failed rank.
pub struct NcclComm {
    raw: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    host: Box<dyn Communicator>,
    op_timeout: Duration,
    stage_f32: Option<CudaSlice<f32>>,
    stage_u8: Option<CudaSlice<u8>>,
    /// Set once the communicator was aborted: every later call fails with this.
    broken: Option<String>,
}

// SAFETY: the NCCL communicator handle is owned by this value alone and used only through
// `&mut self`, so never from two threads at once, which is all NCCL asks of a communicator;
// every call binds the CUDA context to the calling thread first.
unsafe impl Send for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("gpu", &self.stream.context().ordinal())
            .field("broken", &self.broken)
            .finish()
    }
}

impl NcclComm {
    /// Forms the NCCL communicator of the group that `host` connects, on GPU `local_gpu`.
    /// Every rank of `host` must call this at the same time.
    pub fn bootstrap(
        mut host: Box<dyn Communicator>,
        local_gpu: usize,
        timeouts: NcclTimeouts,
    ) -> Result<Self, CommError> {
        let rank = host.rank();
        let ready = local_readiness(local_gpu);
        let id = share_unique_id(host.as_mut(), ready, new_unique_id)?;
        let fail = |message: String| CommError::Nccl { rank, message };
        let ctx = CudaContext::new(local_gpu)
            .map_err(|e| fail(format!("cannot open GPU {local_gpu}: {e}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| fail(format!("cannot create a stream on GPU {local_gpu}: {e}")))?;
        Self::init(host, stream, id, timeouts)
    }

    /// Initialises this rank's communicator on `stream`'s GPU from an agreed `id` (see
    /// `share_unique_id`); `bootstrap` does both.
    pub fn init(
        host: Box<dyn Communicator>,
        stream: Arc<CudaStream>,
        id: [u8; ID_BYTES],
        timeouts: NcclTimeouts,
    ) -> Result<Self, CommError> {
        let rank = host.rank();
        let world = host.world_size();
        let fail = |message: String| CommError::Nccl { rank, message };
        local_readiness(stream.context().ordinal()).map_err(fail)?;
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| fail(format!("cannot use the GPU: {e}")))?;
        let mut unique = sys::ncclUniqueId {
            internal: [0; ID_BYTES],
        };
        for (dst, src) in unique.internal.iter_mut().zip(id.iter()) {
            *dst = *src as std::ffi::c_char;
        }
        let mut config = non_blocking_config();
        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
        let (nranks, me) = (
            i32::try_from(world).map_err(|_| fail(format!("{world} ranks is too many")))?,
            i32::try_from(rank).map_err(|_| fail(format!("rank {rank} is out of range")))?,
        );
        // SAFETY: `raw` and `config` are valid for the call; NCCL copies the config.
        let started =
            unsafe { sys::ncclCommInitRankConfig(&mut raw, nranks, unique, me, &mut config) };
        let mut comm = Self {
            raw,
            stream,
            rank,
            world,
            host,
            op_timeout: timeouts.op,
            stage_f32: None,
            stage_u8: None,
            broken: None,
        };
        if !matches!(
            started,
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
        ) {
            return Err(comm.fail("init", nccl_error_text(started)));
        }
        let deadline = Instant::now() + timeouts.init;
        loop {
            match comm.async_state() {
                sys::ncclResult_t::ncclSuccess => break,
                sys::ncclResult_t::ncclInProgress => {}
                other => return Err(comm.fail("init", nccl_error_text(other))),
            }
            if Instant::now() >= deadline {
                let why = format!("not every rank initialised NCCL within {:?}", timeouts.init);
                return Err(comm.fail("init", why));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::info!(
            rank,
            world,
            gpu = comm.stream.context().ordinal(),
            "NCCL communicator ready"
        );
        Ok(comm)
    }

    /// The stream the collectives run on; a GPU backend enqueues its kernels on it (or makes
    /// its own stream wait for it) so that buffers are ordered with the collectives.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn async_state(&self) -> sys::ncclResult_t {
        if self.raw.is_null() {
            return sys::ncclResult_t::ncclInvalidUsage;
        }
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `raw` is a live communicator (not yet aborted: callers check `broken`).
        let r = unsafe { sys::ncclCommGetAsyncError(self.raw, &mut state) };
        if r == sys::ncclResult_t::ncclSuccess {
            state
        } else {
            r
        }
    }

    /// Aborts the communicator, then asks the TCP ring which rank is gone.
    fn fail(&mut self, op: &'static str, why: String) -> CommError {
        if !self.raw.is_null() {
            // SAFETY: `raw` is live; abort frees it and ends its pending kernels.
            let r = unsafe { sys::ncclCommAbort(self.raw) };
            if r != sys::ncclResult_t::ncclSuccess {
                tracing::warn!(rank = self.rank, result = ?r, "ncclCommAbort failed");
            }
            self.raw = std::ptr::null_mut();
        }
        let message = format!("NCCL {op} failed: {why}; communicator aborted");
        self.broken = Some(message.clone());
        tracing::error!(rank = self.rank, op, %message, "probing the TCP ring for the failed rank");
        match self.host.barrier() {
            Err(ring) => ring,
            Ok(()) => CommError::Nccl {
                rank: self.rank,
                message: format!("{message} (the TCP ring still reaches every rank)"),
            },
        }
    }

    fn check_usable(&self) -> Result<(), CommError> {
        match &self.broken {
            Some(m) => Err(CommError::Nccl {
                rank: self.rank,
                message: format!("the communicator is unusable after an earlier failure: {m}"),
            }),
            None => Ok(()),
        }
    }

    fn driver_error(&self, e: impl std::fmt::Display) -> CommError {
        CommError::Nccl {
            rank: self.rank,
            message: format!("CUDA: {e}"),
        }
    }

    /// Enqueues one NCCL call on the stream and waits, bounded by the op timeout, until it has
    /// completed on the GPU.
    fn run(
        &mut self,
        op: &'static str,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
    ) -> Result<(), CommError> {
        self.check_usable()?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| self.driver_error(e))?;
        let r = call(self.raw, self.stream.cu_stream() as sys::cudaStream_t);
        if !matches!(
            r,
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
        ) {
            return Err(self.fail(op, nccl_error_text(r)));
        }
        let deadline = Instant::now() + self.op_timeout;
        // A non-blocking communicator may still be enqueuing: wait for that first.
        loop {
            match self.async_state() {
                sys::ncclResult_t::ncclSuccess => break,
                sys::ncclResult_t::ncclInProgress => {}
                other => return Err(self.fail(op, nccl_error_text(other))),
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(op));
            }
            std::thread::yield_now();
        }
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| self.driver_error(e))?;
        let mut idle = 0u32;
        loop {
            match done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.fail(op, format!("CUDA: {e}"))),
            }
            match self.async_state() {
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => {}
                other => return Err(self.fail(op, nccl_error_text(other))),
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(op));
            }
            idle += 1;
            if idle < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn timeout(&mut self, op: &'static str) -> CommError {
        let why = format!(
            "not complete after {:?} (a peer is dead or stuck)",
            self.op_timeout
        );
        self.fail(op, why)
    }

    /// Element-wise sum over all ranks, in place, of a device buffer (f32 or bf16).
    pub fn all_reduce_sum_dev<T: NcclType, B: DevicePtrMut<T>>(
        &mut self,
        buf: &mut B,
    ) -> Result<(), CommError> {
        let count = buf.len();
        if count == 0 {
            return Ok(());
        }
        let stream = self.stream.clone();
        let (ptr, _sync) = buf.device_ptr_mut(&stream);
        // SAFETY: `ptr` addresses `count` elements of T on this GPU, kept alive (and ordered
        // on the stream) by `_sync` until `all_reduce_raw` returns, after the call completed.
        unsafe { self.all_reduce_raw(ptr, count, T::as_nccl_type()) }
    }

    /// In-place sum over all ranks of `count` values of `dtype` at device address `ptr`.
    ///
    /// # Safety
    /// `ptr` must hold `count` values of `dtype` on this GPU, complete and untouched until
    /// this returns (which is after the call completed on the GPU).
    unsafe fn all_reduce_raw(
        &mut self,
        ptr: u64,
        count: usize,
        dtype: sys::ncclDataType_t,
    ) -> Result<(), CommError> {
        self.run("all_reduce", |comm, s| {
            // SAFETY: the caller's contract above.
            unsafe {
                sys::ncclAllReduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    count,
                    dtype,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    s,
                )
            }
        })
    }

    /// Concatenates every rank's `local` in rank order into `out` (`world_size * local.len()`).
    pub fn all_gather_dev<T: NcclType, L: DevicePtr<T>, O: DevicePtrMut<T>>(
        &mut self,
        local: &L,
        out: &mut O,
    ) -> Result<(), CommError> {
        let count = local.len();
        if out.len() != count * self.world {
            return Err(CommError::Usage {
                rank: self.rank,
                message: format!(
                    "all_gather output holds {} values, expected {}",
                    out.len(),
                    count * self.world
                ),
            });
        }
        if count == 0 {
            return Ok(());
        }
        let stream = self.stream.clone();
        let (src, _sync_src) = local.device_ptr(&stream);
        let (dst, _sync_dst) = out.device_ptr_mut(&stream);
        self.run("all_gather", |comm, s| {
            // SAFETY: `src` holds `count` and `dst` `count * world` elements of T on this GPU,
            // alive until the call has completed.
            unsafe {
                sys::ncclAllGather(
                    src as *const c_void,
                    dst as *mut c_void,
                    count,
                    T::as_nccl_type(),
                    comm,
                    s,
                )
            }
        })
    }

    /// Copies `buf` of rank `root` into `buf` of every rank.
    pub fn broadcast_dev<T: NcclType, B: DevicePtrMut<T>>(
        &mut self,
        buf: &mut B,
        root: usize,
    ) -> Result<(), CommError> {
        let root = self.check_root(root)?;
        let count = buf.len();
        if count == 0 {
            return Ok(());
        }
        let stream = self.stream.clone();
        let (ptr, _sync) = buf.device_ptr_mut(&stream);
        self.run("broadcast", |comm, s| {
            // SAFETY: `ptr` addresses `count` elements of T, alive until completion.
            unsafe {
                sys::ncclBroadcast(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    count,
                    T::as_nccl_type(),
                    root,
                    comm,
                    s,
                )
            }
        })
    }

    fn check_root(&self, root: usize) -> Result<i32, CommError> {
        if root >= self.world {
            return Err(CommError::Usage {
                rank: self.rank,
                message: format!("broadcast root {root} is outside a group of {}", self.world),
            });
        }
        i32::try_from(root).map_err(|_| CommError::Usage {
            rank: self.rank,
            message: format!("broadcast root {root} is out of range"),
        })
    }

    /// A device staging buffer of at least `len` elements (grown, never shrunk).
    fn staging<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        stream: &Arc<CudaStream>,
        slot: &mut Option<CudaSlice<T>>,
        len: usize,
    ) -> Result<CudaSlice<T>, cudarc::driver::DriverError> {
        match slot.take() {
            Some(s) if s.len() >= len => Ok(s),
            _ => stream.alloc_zeros::<T>(len.max(1)),
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.check_usable()?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut stage = Self::staging(&self.stream, &mut self.stage_f32, buf.len())
            .map_err(|e| self.driver_error(e))?;
        let result = (|| {
            let mut view = stage.slice_mut(..buf.len());
            self.stream
                .memcpy_htod(&*buf, &mut view)
                .map_err(|e| self.driver_error(e))?;
            self.all_reduce_sum_dev(&mut view)?;
            self.stream
                .memcpy_dtoh(&view, buf)
                .map_err(|e| self.driver_error(e))
        })();
        self.stage_f32 = Some(stage);
        result
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        self.check_usable()?;
        let n = local.len();
        if out.len() != n * self.world {
            return Err(CommError::Usage {
                rank: self.rank,
                message: format!(
                    "all_gather output holds {} values, expected {}",
                    out.len(),
                    n * self.world
                ),
            });
        }
        if n == 0 {
            return Ok(());
        }
        let mut stage = Self::staging(&self.stream, &mut self.stage_f32, n * (self.world + 1))
            .map_err(|e| self.driver_error(e))?;
        let result = (|| {
            let (mut src, mut dst) = stage.split_at_mut(n);
            let mut dst = dst.slice_mut(..n * self.world);
            self.stream
                .memcpy_htod(local, &mut src)
                .map_err(|e| self.driver_error(e))?;
            self.all_gather_dev(&src, &mut dst)?;
            self.stream
                .memcpy_dtoh(&dst, out)
                .map_err(|e| self.driver_error(e))
        })();
        self.stage_f32 = Some(stage);
        result
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        self.check_usable()?;
        self.check_root(root)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut stage = Self::staging(&self.stream, &mut self.stage_u8, buf.len())
            .map_err(|e| self.driver_error(e))?;
        let result = (|| {
            let mut view = stage.slice_mut(..buf.len());
            if self.rank == root {
                self.stream
                    .memcpy_htod(&*buf, &mut view)
                    .map_err(|e| self.driver_error(e))?;
            }
            self.broadcast_dev(&mut view, root)?;
            self.stream
                .memcpy_dtoh(&view, buf)
                .map_err(|e| self.driver_error(e))
        })();
        self.stage_u8 = Some(stage);
        result
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        let mut one = [0.0f32];
        self.all_reduce_sum(&mut one)
    }

    fn moves_device_memory(&self) -> bool {
        true
    }

    unsafe fn all_reduce_sum_device(&mut self, ptr: u64, count: usize) -> Result<(), CommError> {
        if count == 0 {
            return Ok(());
        }
        // SAFETY: the caller guarantees `ptr` holds `count` f32 on this GPU, complete and
        // untouched until this returns.
        unsafe { self.all_reduce_raw(ptr, count, sys::ncclDataType_t::ncclFloat32) }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            // Abort rather than destroy: it never waits on peers that may be gone.
            // SAFETY: `raw` is live and not used after this.
            let _ = self.stream.context().bind_to_thread();
            let _ = unsafe { sys::ncclCommAbort(self.raw) };
            self.raw = std::ptr::null_mut();
        }
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every field NCCL should choose is left
/// undefined (INT_MIN / null). The layout is NCCL 2.30's (cudarc's `nccl` feature); older libraries read only the
/// prefix they know (NCCL copies `min(size, sizeof(its ncclConfig_t))` bytes).
fn non_blocking_config() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 23000,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}
