//! Decoded camera frames, each JPEG decoded once and kept within a memory budget (oldest
//! decoded first out). Misses of one batch are decoded in parallel.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use rayon::prelude::*;

/// A decoded frame: RGB8, row-major, `width × height × 3` bytes.
pub type Rgb = Arc<Vec<u8>>;

pub struct FrameCache {
    budget: usize,
    bytes: usize,
    frames: HashMap<usize, Rgb>,
    order: VecDeque<usize>,
    pub hits: u64,
    pub misses: u64,
}

impl FrameCache {
    pub fn new(budget_bytes: usize) -> FrameCache {
        FrameCache {
            budget: budget_bytes,
            bytes: 0,
            frames: HashMap::new(),
            order: VecDeque::new(),
            hits: 0,
            misses: 0,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The frames of rows `ids`, in order: cached ones as they are, the others decoded (in
    /// parallel) by `decode` from what `encoded` gives. A frame that cannot be had is an error
    /// naming the row.
    pub fn get<'a>(
        &mut self,
        ids: &[usize],
        encoded: impl Fn(usize) -> Option<&'a [u8]> + Sync,
        decode: impl Fn(&[u8]) -> Result<Vec<u8>, String> + Sync,
    ) -> Vec<Result<Rgb, String>> {
        let mut have: HashMap<usize, Rgb> = HashMap::new();
        let mut missing = Vec::new();
        for &i in ids {
            match self.frames.get(&i) {
                Some(f) => {
                    self.hits += 1;
                    have.insert(i, f.clone());
                }
                None if !missing.contains(&i) => missing.push(i),
                None => self.hits += 1,
            }
        }
        self.misses += missing.len() as u64;
        let decoded: Vec<(usize, Result<Vec<u8>, String>)> = missing
            .par_iter()
            .map(|&i| (i, encoded(i).ok_or_else(|| "no image".to_string()).and_then(&decode)))
            .collect();
        let mut failed = HashMap::new();
        for (i, r) in decoded {
            match r {
                Ok(rgb) => {
                    let rgb = Arc::new(rgb);
                    have.insert(i, rgb.clone());
                    self.insert(i, rgb);
                }
                Err(e) => {
                    failed.insert(i, e);
                }
            }
        }
        ids.iter()
            .map(|i| match have.get(i) {
                Some(f) => Ok(f.clone()),
                None => Err(failed.get(i).cloned().unwrap_or_default()),
            })
            .collect()
    }

    fn insert(&mut self, id: usize, rgb: Rgb) {
        self.bytes += rgb.len();
        self.frames.insert(id, rgb);
        self.order.push_back(id);
        while self.bytes > self.budget && self.order.len() > 1 {
            if let Some(old) = self.order.pop_front() {
                if let Some(f) = self.frames.remove(&old) {
                    self.bytes -= f.len();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_frame_is_decoded_once_and_the_budget_holds() {
        let encoded: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 4]).collect();
        let decode = |b: &[u8]| -> Result<Vec<u8>, String> {
            if b[0] == 7 {
                Err("corrupt".into())
            } else {
                Ok(b.repeat(25))
            }
        };
        let mut c = FrameCache::new(350);
        let got = c.get(&[1, 2, 1], |i| Some(&encoded[i][..]), decode);
        assert_eq!(got[0].as_ref().unwrap()[0], 1);
        assert_eq!(got[2].as_ref().unwrap()[0], 1);
        assert_eq!((c.hits, c.misses), (1, 2));
        c.get(&[1, 2], |i| Some(&encoded[i][..]), decode);
        assert_eq!((c.hits, c.misses), (3, 2), "cached frames are not decoded again");
        let got = c.get(&[3, 4, 5, 7], |i| Some(&encoded[i][..]), decode);
        assert!(got[..3].iter().all(|r| r.is_ok()));
        assert_eq!(got[3].as_ref().unwrap_err(), "corrupt");
        assert!(c.bytes() <= 350, "{} bytes over the budget", c.bytes());
        assert!(c.get(&[9], |_| None, decode)[0].is_err());
    }
}
