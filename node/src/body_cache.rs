//! Copies of the bodies this node just stored, for their first delivery
//! (`delivery.body_cache`): a message is usually delivered moments after
//! it was accepted, and its body is then still in memory here. Reading it
//! back from the spool costs a thread hand-off and a read on the local
//! spool, and a round trip that carries the whole body on Redis.
//!
//! Bounded in bytes, oldest out first. A delivery takes its copy; a
//! message with several deliveries, one retried or one taken by another
//! node reads the spool as before. Bodies are never changed once stored,
//! so a copy is never stale; one whose message is gone is never asked for
//! and leaves with the oldest.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use smarthost_proto::envelope::MessageId;

use crate::spool::{Body, READ_WHOLE_UP_TO};

pub struct BodyCache {
    capacity: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    bodies: HashMap<MessageId, Vec<u8>>,
    /// Insertion order; an id whose body was taken stays until it comes up.
    order: VecDeque<MessageId>,
    bytes: u64,
}

impl BodyCache {
    /// Holds up to `capacity` bytes of bodies; 0 holds none.
    pub fn new(capacity: u64) -> BodyCache {
        BodyCache {
            capacity,
            state: Mutex::new(State::default()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.capacity > 0
    }

    /// A copy of `body` to keep, when it is whole in memory and small
    /// enough to be read whole (larger ones are delivered from disk a
    /// chunk at a time).
    pub fn copy_of(&self, body: &Body) -> Option<Vec<u8>> {
        let len = body.len();
        let fits = body.rest().is_none() && len <= READ_WHOLE_UP_TO && len <= self.capacity;
        (self.is_enabled() && fits).then(|| body.head().to_vec())
    }

    /// Keeps the copies of stored bodies, dropping the oldest past the
    /// capacity.
    pub fn keep(&self, copies: impl IntoIterator<Item = (MessageId, Vec<u8>)>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (id, body) in copies {
            state.bytes += body.len() as u64;
            if let Some(old) = state.bodies.insert(id.clone(), body) {
                state.bytes -= old.len() as u64;
            }
            state.order.push_back(id);
        }
        while state.bytes > self.capacity {
            let Some(oldest) = state.order.pop_front() else {
                break;
            };
            if let Some(body) = state.bodies.remove(&oldest) {
                state.bytes -= body.len() as u64;
            }
        }
        // Ids of taken bodies pile up only while nothing is evicted.
        if state.order.len() > 2 * state.bodies.len() + 1024 {
            let State { bodies, order, .. } = &mut *state;
            order.retain(|id| bodies.contains_key(id));
        }
        crate::metrics::body_cache(state.bytes);
    }

    /// The kept body of `id`, no longer kept.
    pub fn take(&self, id: &MessageId) -> Option<Body> {
        if !self.is_enabled() {
            return None;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let body = state.bodies.remove(id);
        crate::metrics::body_cache_read(body.is_some());
        let body = body?;
        state.bytes -= body.len() as u64;
        crate::metrics::body_cache(state.bytes);
        Some(Body::from(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> MessageId {
        MessageId::new(n, 0)
    }

    fn keep(cache: &BodyCache, n: u64, len: usize) {
        let body = Body::from(vec![n as u8; len]);
        let copy = cache.copy_of(&body).expect("kept");
        cache.keep([(id(n), copy)]);
    }

    #[test]
    fn a_body_is_taken_once() {
        let cache = BodyCache::new(1000);
        keep(&cache, 1, 10);
        assert_eq!(cache.take(&id(1)).unwrap().head(), &[1u8; 10][..]);
        assert!(cache.take(&id(1)).is_none());
        assert!(cache.take(&id(2)).is_none());
    }

    #[test]
    fn the_oldest_go_first_past_the_capacity() {
        let cache = BodyCache::new(100);
        for n in 1..=4 {
            keep(&cache, n, 30);
        }
        // 120 bytes: the first went.
        assert!(cache.take(&id(1)).is_none());
        assert!(cache.take(&id(2)).is_some());
        // A taken body frees its room: 5 and 6 fit beside 3 and 4.
        keep(&cache, 5, 30);
        assert!(cache.take(&id(3)).is_some());
        assert!(cache.take(&id(4)).is_some());
        assert!(cache.take(&id(5)).is_some());
    }

    #[test]
    fn what_is_not_whole_in_memory_or_too_large_is_not_kept() {
        let cache = BodyCache::new(1 << 30);
        let large = Body::from(vec![0u8; READ_WHOLE_UP_TO as usize + 1]);
        assert!(cache.copy_of(&large).is_none());
        let file = tempfile::tempfile().unwrap();
        let spilled = Body::spilled(vec![1, 2], file, 0);
        assert!(cache.copy_of(&spilled).is_none());
        assert!(BodyCache::new(5)
            .copy_of(&Body::from(vec![0u8; 6]))
            .is_none());
        let off = BodyCache::new(0);
        assert!(off.copy_of(&Body::from(vec![1u8])).is_none());
        assert!(off.take(&id(1)).is_none());
    }

    #[test]
    fn ids_of_taken_bodies_do_not_pile_up() {
        let cache = BodyCache::new(1 << 20);
        for n in 0..10_000 {
            keep(&cache, n, 1);
            assert!(cache.take(&id(n)).is_some());
        }
        let state = cache.state.lock().unwrap();
        assert!(state.order.len() <= 1025, "{}", state.order.len());
        assert_eq!(state.bytes, 0);
    }
}
