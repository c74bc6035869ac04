//! Segments mapped read-only into Skua's memory, so that a disk hit whose pages the page cache
//! holds is a view of those pages: no read system call and no copy into a buffer of Skua's
//! (benches/README.md §20: a 256 KiB hit cost 93.6 µs of proxy core with `pread`, 58.7 µs
//! mapped). A view is only made of bytes within the file (`fstat(2)`) whose pages the page
//! cache holds now (`mincore(2)`), so touching it never waits for the disk; anything else is
//! read with `pread` as before
//! ([`super::read`]). This module maps and views; it does not check what it views (the block
//! CRCs are checked by the caller) and it does not decide what is read.
//!
//! # Why `unsafe` is sound here
//!
//! The crate forbids `unsafe` everywhere else (`#![deny(unsafe_code)]` in `lib.rs`, this
//! module's `allow` the one exception). A slice of a mapping is only sound if the bytes under
//! it do not change while it lives and stay mapped and backed:
//! - **Nothing Skua does changes a byte a view covers.** A segment is written only by
//!   appending: the writer places a record past everything written before it, and a record is
//!   indexed (so readable) only after it has been written whole (`writer.rs`). No code path
//!   truncates a segment (there is no `set_len` in `src/`) or writes where a record was. A
//!   segment's name is never reused: a new one is a new file (`segments.rs` removes a leftover
//!   before creating), and an evicted one is unlinked, which leaves the pages of an inode still
//!   mapped in place until the last view of it is dropped.
//! - **The mapping outlives every view**: a view holds an [`Arc`] of its [`Mapping`], which
//!   unmaps when the last one is dropped.
//! - **Every byte of a view is within the file, and every page of it in the page cache, when
//!   the view is made** ([`Mapping::view`] asks `fstat(2)`, then `mincore(2)` unless the file
//!   system keeps its files in memory). The length is asked each time because the page cache
//!   can still hold a page past a truncated end (a large folio the truncation did not split).
//!   A segment cut short (a damaged disk, the tests' own truncation) is read with `pread`
//!   instead, which sees the short read.
//! - **What is outside Skua's control** is the same as for any memory-mapped store: another
//!   process writing into or truncating the cache directory's files *while a view of them is
//!   being read*, or the kernel evicting a page between `mincore` and the read and then failing
//!   to read it back. The first changes bytes under a view (the CRC check may then pass bytes
//!   that changed after it); the second and a truncation raise `SIGBUS`. The cache directory
//!   belongs to Skua alone (docs/disk-format.md), as its crash safety already assumes.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

/// Pages asked of `mincore` per call: its answer fills a buffer on the stack.
const PAGES_PER_ASK: usize = 256;

/// One segment file mapped read-only, shared, from offset 0.
pub struct Mapping {
    addr: std::ptr::NonNull<u8>,
    len: usize,
    file: Arc<File>,
    /// The file lives in memory (tmpfs): every page is in the page cache (or swap, which a
    /// `pread` would wait for as well), so `mincore` need not be asked.
    in_memory: bool,
}

// SAFETY: the mapping is read-only memory owned by this value, unmapped only in `drop`; reading
// it from any thread is as safe as reading any shared immutable byte slice (see the module
// comment for why the bytes do not change).
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: `&Mapping` only ever reads.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file` (its length now, or more: a segment being written
    /// grows into its mapping, whose pages past the end are never viewed).
    pub fn new(file: Arc<File>, len: u64, in_memory: bool) -> io::Result<Mapping> {
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a new read-only shared mapping chosen by the kernel (null hint), of a file
        // this process opened; the result is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = std::ptr::NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))?;
        Ok(Mapping {
            addr,
            len,
            file,
            in_memory,
        })
    }

    /// `len` bytes at `at` as a [`Bytes`] that keeps the mapping, if they are within the file
    /// and every page under them is in the page cache now; `None` otherwise (the caller reads
    /// them with `pread`).
    pub fn view(self: &Arc<Self>, at: u64, len: usize) -> Option<Bytes> {
        let start = usize::try_from(at).ok()?;
        let end = start.checked_add(len)?;
        if end > self.len || len == 0 {
            return None;
        }
        // The file's length, asked each time: a page past the end may still be in the page
        // cache (a large folio the truncation could not split), but touching it would raise
        // SIGBUS.
        let file_len = rustix::fs::fstat(&*self.file).ok()?.st_size;
        let file_len = u64::try_from(file_len).ok()?;
        if end as u64 > file_len || !(self.in_memory || self.resident(start, end)) {
            return None;
        }
        Some(Bytes::from_owner(View {
            map: self.clone(),
            start,
            len,
        }))
    }

    /// Whether the page cache holds every page of bytes `start..end` (within the mapping).
    fn resident(&self, start: usize, end: usize) -> bool {
        let page = page_size();
        let mut at = start - start % page;
        let mut answer = [0u8; PAGES_PER_ASK];
        while at < end {
            let pages = (end - at).div_ceil(page).min(PAGES_PER_ASK);
            let ask = pages * page;
            // SAFETY: `at` is page-aligned and `at..at + ask` lies within this mapping, which
            // the kernel rounds up to whole pages (`end <= self.len`); `answer` has room for
            // `pages` bytes.
            let rc = unsafe {
                libc::mincore(self.addr.as_ptr().add(at).cast(), ask, answer.as_mut_ptr())
            };
            // Bit 0: the page is resident.
            if rc != 0 || answer[..pages].iter().any(|&p| p & 1 == 0) {
                return false;
            }
            at += ask;
        }
        true
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no view outlives it (each holds
        // an `Arc` of it).
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.len);
        }
    }
}

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the system.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size)
            .ok()
            .filter(|&s| s > 0)
            .unwrap_or(4096)
    })
}

/// Bytes of a mapping, owned by the [`Bytes`] a hit sends.
struct View {
    map: Arc<Mapping>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `start..start + len` was checked to lie within the mapping and in the page
        // cache when the view was made, the mapping lives as long as `self.map`, and nothing
        // Skua does writes those bytes again (module comment).
        unsafe { std::slice::from_raw_parts(self.map.addr.as_ptr().add(self.start), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_view_shows_the_file_and_none_is_made_past_its_end() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).unwrap();
        let map = Arc::new(Mapping::new(Arc::new(file), 1 << 20, false).unwrap());
        let view = map.view(100, 15_000).unwrap();
        assert_eq!(&view[..], &data[100..15_100]);
        // Past the file's end: no page there is in the page cache.
        assert!(map.view(16_384, 8_192).is_none());
        // Past the mapping.
        assert!(map.view((1 << 20) - 10, 20).is_none());
        drop(map);
        // The view keeps the mapping.
        assert_eq!(view[0], data[100]);
    }

    #[test]
    fn a_file_cut_short_is_not_viewed() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![7u8; 64 * 1024]).unwrap();
        let file = Arc::new(file);
        let map = Arc::new(Mapping::new(file.clone(), 64 * 1024, false).unwrap());
        assert!(map.view(40_000, 20_000).is_some());
        file.set_len(16 * 1024).unwrap();
        assert!(map.view(40_000, 20_000).is_none());
        assert!(map.view(0, 1_000).is_some());
    }
}
