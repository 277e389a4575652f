//! The SecAgg+ neighbour graph: which clients share secrets and masks with which.

use crate::crypto::derive_key;
use crate::prg::MaskPrg;
use crate::ClientId;

/// Undirected neighbour graph over clients `0..num_clients`, derived from a public seed.
///
/// With `group_size == num_clients` it is the complete graph (full SecAgg). Otherwise
/// the clients are shuffled onto a ring by a PRG keyed from the seed and each is joined
/// to the `(group_size - 1) / 2` nearest clients on either side, so that every client
/// has exactly `group_size - 1` neighbours and the relation is symmetric.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Graph {
    /// Sorted neighbour lists, the client itself excluded.
    neighbours: Vec<Vec<ClientId>>,
}

impl Graph {
    pub(crate) fn new(num_clients: u32, group_size: u32, seed: &[u8; 32]) -> Self {
        let n = num_clients as usize;
        if group_size >= num_clients {
            let neighbours = (0..num_clients)
                .map(|me| (0..num_clients).filter(|&other| other != me).collect())
                .collect();
            return Graph { neighbours };
        }
        let mut prg = MaskPrg::new(&derive_key(seed, 0, b"neighbour graph", 0, 0));
        let mut ring: Vec<ClientId> = (0..num_clients).collect();
        // Fisher-Yates; the multiply-shift bias (< n / 2^64) is irrelevant for a public
        // graph.
        for i in (1..n).rev() {
            let j = ((u128::from(prg.next_u64()) * (i as u128 + 1)) >> 64) as usize;
            ring.swap(i, j);
        }
        let half = (group_size as usize - 1) / 2;
        let mut neighbours = vec![Vec::with_capacity(2 * half); n];
        for (position, &me) in ring.iter().enumerate() {
            for offset in 1..=half {
                neighbours[me as usize].push(ring[(position + offset) % n]);
                neighbours[me as usize].push(ring[(position + n - offset) % n]);
            }
        }
        for list in &mut neighbours {
            list.sort_unstable();
        }
        Graph { neighbours }
    }

    /// The neighbours of `client`, sorted, `client` itself excluded.
    pub fn neighbours(&self, client: ClientId) -> &[ClientId] {
        &self.neighbours[client as usize]
    }

    pub fn are_neighbours(&self, a: ClientId, b: ClientId) -> bool {
        self.neighbours(a).binary_search(&b).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_graph_is_regular_and_symmetric() {
        let graph = Graph::new(100, 21, &[9; 32]);
        for me in 0..100 {
            let list = graph.neighbours(me);
            assert_eq!(list.len(), 20);
            assert!(!list.contains(&me));
            for &other in list {
                assert!(graph.are_neighbours(other, me));
            }
        }
    }

    #[test]
    fn seed_changes_the_graph_and_complete_graph_has_everyone() {
        assert_ne!(Graph::new(50, 7, &[1; 32]), Graph::new(50, 7, &[2; 32]));
        assert_eq!(Graph::new(50, 7, &[1; 32]), Graph::new(50, 7, &[1; 32]));
        let complete = Graph::new(6, 6, &[0; 32]);
        assert_eq!(complete.neighbours(2), &[0, 1, 3, 4, 5]);
    }
}
