//! Committing a freshly allocated pool: touching every page at start, so that memory the node
//! cannot give fails the start with a message rather than a step under load with the OOM
//! killer.
//!
//! A large zeroed allocation is only reserved address space until each page is first written.
//! `commit` writes one byte per page, in slices of [`SLICE_BYTES`] on the rayon pool that runs
//! it, and before each slice asks how much memory is still free: when less than the rest of
//! the pool, it stops and says what to change, before the kernel would have to kill something.
//! Progress goes to the log (the worker's start-up log is its console) every tenth of the
//! pool, for pools of at least [`PROGRESS_FROM`] (a few seconds per GiB on a busy VM).

use rayon::prelude::*;

use super::budget::{FIX_SMALLER, human};

/// Bytes touched between two checks of the free memory.
pub const SLICE_BYTES: usize = 256 << 20;
/// Pools of at least this size log their progress.
pub const PROGRESS_FROM: usize = 1 << 30;
/// Bytes between two touched addresses (the smallest page size on the supported targets).
const PAGE: usize = 4096;

/// Writes one zero byte per page of `regions` (memory that reads as zeros already, as a
/// zeroed allocation does) so the kernel backs every page now. `free` reports the bytes still
/// free to this process (None: unknown, no check). Err names the shortfall and the fix.
pub fn commit(
    regions: &mut [&mut [u8]],
    free: &mut dyn FnMut() -> Option<u64>,
) -> Result<(), String> {
    let total: usize = regions.iter().map(|r| r.len()).sum();
    let mut done = 0usize;
    let mut next_tenth = 1;
    let started = std::time::Instant::now();
    let loud = total >= PROGRESS_FROM;
    if loud {
        tracing::info!(
            bytes = total,
            size = %human(total as u64),
            "committing the KV pool (touching every page)"
        );
    }
    for region in regions.iter_mut() {
        for slice in region.chunks_mut(SLICE_BYTES) {
            let left = (total - done) as u64;
            if let Some(f) = free()
                && f < left
            {
                return Err(format!(
                    "the KV pool needs {} more but only {} is free ({} of {} committed); {FIX_SMALLER}",
                    human(left),
                    human(f),
                    human(done as u64),
                    human(total as u64)
                ));
            }
            touch(slice);
            done += slice.len();
            if loud && done * 10 >= next_tenth * total && done < total {
                next_tenth = done * 10 / total + 1;
                tracing::info!(
                    committed = done,
                    of = total,
                    percent = done * 100 / total.max(1),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "committing the KV pool"
                );
            }
        }
    }
    if loud {
        tracing::info!(
            bytes = total,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "KV pool committed"
        );
    }
    Ok(())
}

/// Touches the pages of `slice` in parallel (page faults scale with threads).
fn touch(slice: &mut [u8]) {
    slice.par_chunks_mut(1 << 20).for_each(|chunk| {
        for i in (0..chunk.len()).step_by(PAGE) {
            // SAFETY: i < chunk.len(); a volatile write of the zero that is already there
            // only makes the kernel back the page (a plain store of zero into zeroed memory
            // may be optimized away).
            unsafe { std::ptr::write_volatile(chunk.as_mut_ptr().add(i), 0) };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `buf` the kernel backs now (mincore).
    fn resident_pages(buf: &[u8]) -> usize {
        let start = buf.as_ptr() as usize / PAGE * PAGE;
        let end = buf.as_ptr() as usize + buf.len();
        let pages = (end - start).div_ceil(PAGE);
        let mut vec = vec![0u8; pages];
        // SAFETY: [start, end) is mapped (it holds `buf`, page-aligned down); `vec` has one
        // byte per page.
        let rc = unsafe {
            libc::mincore(
                start as *mut libc::c_void,
                end - start,
                vec.as_mut_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    fn zeroed(len: usize) -> Box<[u8]> {
        bytemuck::allocation::try_zeroed_slice_box(len).unwrap()
    }

    #[test]
    fn every_page_is_backed_after_commit() {
        let mut buf = zeroed(64 << 20);
        let pages = buf.len() / PAGE;
        assert!(
            resident_pages(&buf) < pages / 2,
            "a fresh zeroed allocation is not backed yet"
        );
        commit(&mut [&mut buf[..]], &mut || None).unwrap();
        assert!(resident_pages(&buf) >= pages, "every page is backed");
        assert!(buf.iter().all(|&b| b == 0), "contents stay zero");
    }

    #[test]
    fn too_little_free_memory_stops_before_touching_and_names_the_fix() {
        let mut buf = zeroed(3 * SLICE_BYTES);
        let mut calls = 0;
        let mut free = || {
            calls += 1;
            // Enough for the first slice only, then someone else takes the rest.
            Some(if calls == 1 {
                3 * SLICE_BYTES as u64
            } else {
                0
            })
        };
        let e = commit(&mut [&mut buf[..]], &mut free).unwrap_err();
        assert!(
            e.contains("needs 512.00 MiB more but only 0 B is free"),
            "{e}"
        );
        assert!(e.contains("256.00 MiB of 768.00 MiB committed"), "{e}");
        assert!(e.contains("--kv_cache_free_gpu_memory_fraction"), "{e}");
        assert!(e.contains("memory.max"), "{e}");
        assert!(
            resident_pages(&buf[2 * SLICE_BYTES..]) < SLICE_BYTES / PAGE / 2,
            "the last slice was not touched"
        );
    }
}
