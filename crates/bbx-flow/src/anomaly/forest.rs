//! An Isolation Forest (Liu, Ting and Zhou, 2008): random axis-parallel splits
//! isolate an unusual point in fewer steps than a usual one, so a short average
//! path means an anomaly.
//!
//! Written here rather than taken from `extended-isolation-forest`: that crate's
//! nodes hold a normal vector and an intercept point (two `[f64; N]`), which for
//! one model per agent is over a megabyte an agent; these nodes are 12 bytes, a
//! model of [`TREES`] trees about 80 KB, and scoring walks 8 levels per tree
//! without allocating.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Trees per forest.
pub const TREES: usize = 64;
/// Points each tree is grown from (the paper's ψ; 256 there, but agents' windows
/// are small and 64 loses little: the paper's own curves flatten from 64).
pub const SAMPLE: usize = 64;

/// Each node, in pre-order: a split's left child is the next node.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Node {
    /// The feature split on; [`LEAF`] for a leaf.
    feature: u8,
    /// A split's threshold, or a leaf's count of training points.
    value: f32,
    /// A split's right child.
    right: u32,
}

const LEAF: u8 = u8::MAX;

/// A trained forest over points of `dims` features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forest {
    dims: usize,
    /// Every tree's nodes, one after the other, starting at `roots`.
    nodes: Vec<Node>,
    roots: Vec<u32>,
    /// c(ψ): the average path length of an unsuccessful search in a binary search
    /// tree of ψ points, which normalises path lengths into a score.
    normaliser: f32,
}

/// The average path length of an unsuccessful search among `n` points.
fn average_path(n: f32) -> f32 {
    if n <= 1.0 {
        0.0
    } else if n <= 2.0 {
        1.0
    } else {
        const EULER: f32 = 0.577_215_7;
        2.0 * ((n - 1.0).ln() + EULER) - 2.0 * (n - 1.0) / n
    }
}

impl Forest {
    /// Grows a forest on `points` (each of the same length); `None` without two
    /// points.
    pub fn train(points: &[Vec<f32>], rng: &mut impl Rng) -> Option<Self> {
        let dims = points.first()?.len();
        if points.len() < 2 || dims == 0 || dims >= usize::from(LEAF) {
            return None;
        }
        let sample = SAMPLE.min(points.len());
        let height = (sample as f32).log2().ceil() as usize;
        let mut forest = Self {
            dims,
            nodes: Vec::with_capacity(TREES * 2 * sample),
            roots: Vec::with_capacity(TREES),
            normaliser: average_path(sample as f32),
        };
        for _ in 0..TREES {
            let mut chosen: Vec<&[f32]> = rand::seq::index::sample(rng, points.len(), sample)
                .into_iter()
                .map(|i| points[i].as_slice())
                .collect();
            forest.roots.push(forest.nodes.len() as u32);
            forest.grow(&mut chosen, height, rng);
        }
        Some(forest)
    }

    fn grow(&mut self, points: &mut [&[f32]], height: usize, rng: &mut impl Rng) {
        let leaf = |points: &[&[f32]]| Node {
            feature: LEAF,
            value: points.len() as f32,
            right: 0,
        };
        if height == 0 || points.len() <= 1 {
            self.nodes.push(leaf(points));
            return;
        }
        // A split on a feature that varies here; none varies: the points are one.
        let ranges: Vec<(usize, f32, f32)> = (0..self.dims)
            .filter_map(|d| {
                let (lo, hi) = points.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), p| {
                    (lo.min(p[d]), hi.max(p[d]))
                });
                (hi > lo).then_some((d, lo, hi))
            })
            .collect();
        if ranges.is_empty() {
            self.nodes.push(leaf(points));
            return;
        }
        let (feature, lo, hi) = ranges[rng.random_range(0..ranges.len())];
        let threshold = rng.random_range(lo..hi);
        let at = self.nodes.len();
        self.nodes.push(Node {
            feature: feature as u8,
            value: threshold,
            right: 0,
        });
        let mut split = 0;
        for i in 0..points.len() {
            if points[i][feature] < threshold {
                points.swap(i, split);
                split += 1;
            }
        }
        let (left, right) = points.split_at_mut(split);
        self.grow(left, height - 1, rng);
        self.nodes[at].right = self.nodes.len() as u32;
        self.grow(right, height - 1, rng);
    }

    /// The anomaly score of `point`, in (0, 1): near 1 is isolated at once (an
    /// anomaly), 0.5 and below is as deep as the training points.
    pub fn score(&self, point: &[f32]) -> f32 {
        let mut total = 0.0;
        for &root in &self.roots {
            let mut at = root as usize;
            let mut depth = 0.0;
            loop {
                let node = self.nodes[at];
                if node.feature == LEAF {
                    total += depth + average_path(node.value);
                    break;
                }
                depth += 1.0;
                at = if point.get(usize::from(node.feature)).copied().unwrap_or(0.0) < node.value {
                    at + 1
                } else {
                    node.right as usize
                };
            }
        }
        let mean = total / self.roots.len().max(1) as f32;
        2f32.powf(-mean / self.normaliser.max(f32::EPSILON))
    }

    /// Bytes the forest holds.
    pub fn bytes(&self) -> usize {
        self.nodes.len() * std::mem::size_of::<Node>() + self.roots.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn an_outlier_scores_above_every_inlier() {
        let mut rng = StdRng::seed_from_u64(7);
        let points: Vec<Vec<f32>> = (0..500)
            .map(|_| vec![rng.random_range(0.0..1.0), rng.random_range(0.0..1.0)])
            .collect();
        let forest = Forest::train(&points, &mut rng).expect("trained");
        let outlier = forest.score(&[5.0, 5.0]);
        let inlier = forest.score(&[0.5, 0.5]);
        assert!(outlier > 0.6, "outlier {outlier}");
        assert!(inlier < 0.5, "inlier {inlier}");
        assert!(forest.bytes() < 100_000, "{} bytes", forest.bytes());
    }

    #[test]
    fn identical_points_make_leaves_and_score_finite() {
        let points = vec![vec![1.0, 2.0]; 10];
        let forest = Forest::train(&points, &mut StdRng::seed_from_u64(1)).expect("trained");
        assert!(forest.score(&[1.0, 2.0]).is_finite());
        assert!(Forest::train(&points[..1], &mut StdRng::seed_from_u64(1)).is_none());
    }

    #[test]
    fn a_forest_round_trips_through_json() {
        let mut rng = StdRng::seed_from_u64(3);
        let points: Vec<Vec<f32>> = (0..100).map(|i| vec![i as f32, (i % 7) as f32]).collect();
        let forest = Forest::train(&points, &mut rng).expect("trained");
        let back: Forest = serde_json::from_slice(&serde_json::to_vec(&forest).unwrap()).unwrap();
        assert_eq!(back, forest);
        assert_eq!(back.score(&[3.0, 3.0]), forest.score(&[3.0, 3.0]));
    }
}
