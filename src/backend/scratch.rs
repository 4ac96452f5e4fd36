//! Reusable f32 scratch buffers for the bf16 CPU backend, whose ops widen bf16 inputs and outputs to f32
//! around the f32 op bodies. Taking a buffer from the pool instead of the allocator avoids fresh pages
//! (zero-filling and page faults) on every op of every layer. The pool keeps a few buffers, so its memory is
//! bounded by the largest ops' operands.

use std::sync::Mutex;

/// Buffers kept for reuse (more are freed).
const KEPT: usize = 8;

#[derive(Default)]
pub struct ScratchPool {
    free: Mutex<Vec<Vec<f32>>>,
}

impl ScratchPool {
    /// A buffer of `len` values whose contents are unspecified (the caller overwrites all of them).
    pub fn take(&self, len: usize) -> Scratch<'_> {
        let reused = self.free.lock().ok().and_then(|mut free| {
            // The smallest buffer that is large enough, else the largest (grown below).
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .or_else(|| free.iter().enumerate().max_by_key(|(_, b)| b.len()))
                .map(|(i, _)| i)?;
            Some(free.swap_remove(best))
        });
        let mut buf = reused.unwrap_or_default();
        // Elements already initialised are kept as they are; only growth is zero-filled. Never
        // shortened: ops of alternating sizes (a layer norm's output, then the wider FFN's) would
        // otherwise zero-fill the difference again on every op (2% of a bf16 ESM-2 profile).
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        Scratch {
            buf,
            len,
            pool: self,
        }
    }
}

/// A buffer lent by a [`ScratchPool`] (its first `len` values), returned to it when dropped.
pub struct Scratch<'p> {
    buf: Vec<f32>,
    len: usize,
    pool: &'p ScratchPool,
}

impl std::ops::Deref for Scratch<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for Scratch<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        if let Ok(mut free) = self.pool.free.lock() {
            if free.len() < KEPT {
                free.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_sized() {
        let pool = ScratchPool::default();
        let addr = {
            let mut a = pool.take(1000);
            a[999] = 1.0;
            a.as_ptr() as usize
        };
        let b = pool.take(500);
        assert_eq!(b.len(), 500);
        assert_eq!(b.as_ptr() as usize, addr, "a returned buffer is lent again");
        let c = pool.take(2000);
        assert_eq!(c.len(), 2000);
        assert_ne!(c.as_ptr() as usize, b.as_ptr() as usize);
        drop((b, c));
        // A shorter loan keeps the buffer's length: the longer one after it needs no zero-filling.
        let d = pool.take(1500);
        assert_eq!(d.len(), 1500);
        assert!(
            d.buf.len() >= 2000,
            "the buffer was shortened to {}",
            d.buf.len()
        );
    }
}
