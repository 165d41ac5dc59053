//! The bodies this node just stored, for their first delivery
//! (`delivery.body_cache`): a message is usually delivered moments after
//! it was accepted, and its body is then still in memory here. Reading it
//! back from the spool costs a thread hand-off and a read on the local
//! spool, and a round trip that carries the whole body on Redis.
//!
//! The cache shares each body's bytes with the store that wrote them (a
//! [`Body`] clone), so keeping it costs no copy.
//!
//! Bounded in bytes, oldest out first. A delivery takes its body; a
//! message with several deliveries, one retried or one taken by another
//! node reads the spool as before. Bodies are never changed once stored,
//! so a kept body is never stale; one whose message is gone is never asked for
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
    bodies: HashMap<MessageId, Body>,
    /// Insertion order; an id whose body was taken stays until it comes up.
    order: VecDeque<MessageId>,
    /// The memory of the kept bodies ([`Body::held`]).
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

    /// `body`'s bytes to keep, shared, when it is whole in memory and small
    /// enough to be read whole (larger ones are delivered from disk a
    /// chunk at a time).
    pub fn share(&self, body: &Body) -> Option<Body> {
        let fits = body.rest().is_none()
            && body.len() <= READ_WHOLE_UP_TO
            && body.held() as u64 <= self.capacity;
        (self.is_enabled() && fits).then(|| body.clone())
    }

    /// Keeps the bodies of stored messages, dropping the oldest past the
    /// capacity.
    pub fn keep(&self, bodies: impl IntoIterator<Item = (MessageId, Body)>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (id, body) in bodies {
            state.bytes += body.held() as u64;
            if let Some(old) = state.bodies.insert(id.clone(), body) {
                state.bytes -= old.held() as u64;
            }
            state.order.push_back(id);
        }
        while state.bytes > self.capacity {
            let Some(oldest) = state.order.pop_front() else {
                break;
            };
            if let Some(body) = state.bodies.remove(&oldest) {
                state.bytes -= body.held() as u64;
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
        state.bytes -= body.held() as u64;
        crate::metrics::body_cache(state.bytes);
        Some(body)
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
        let shared = cache.share(&body).expect("kept");
        cache.keep([(id(n), shared)]);
    }

    #[test]
    fn a_body_is_taken_once() {
        let cache = BodyCache::new(1000);
        keep(&cache, 1, 10);
        assert_eq!(cache.take(&id(1)).unwrap().head(), &[1u8; 10][..]);
        assert!(cache.take(&id(1)).is_none());
        assert!(cache.take(&id(2)).is_none());
    }

    /// The cache holds the stored body's own bytes: keeping and taking
    /// them copies nothing.
    #[test]
    fn a_kept_body_is_the_stored_bytes_not_a_copy() {
        let cache = BodyCache::new(1000);
        let body = Body::from(vec![7u8; 100]);
        cache.keep([(id(7), cache.share(&body).unwrap())]);
        let taken = cache.take(&id(7)).unwrap();
        assert_eq!(taken.head().as_ptr(), body.head().as_ptr());
        assert_eq!(taken, body);
    }

    /// A body kept in its receive buffer costs the whole buffer.
    #[test]
    fn a_body_counts_the_buffer_it_holds() {
        let cache = BodyCache::new(100);
        for n in 1..=2 {
            let mut buffer = Vec::with_capacity(64);
            buffer.extend([n as u8; 10]);
            let body = Body::from(buffer);
            cache.keep([(id(n), cache.share(&body).unwrap())]);
        }
        assert!(cache.take(&id(1)).is_none(), "128 bytes held, 20 received");
        assert!(cache.take(&id(2)).is_some());
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
        assert!(cache.share(&large).is_none());
        let file = tempfile::tempfile().unwrap();
        let spilled = Body::spilled(vec![1, 2], file, 0);
        assert!(cache.share(&spilled).is_none());
        assert!(BodyCache::new(5).share(&Body::from(vec![0u8; 6])).is_none());
        let off = BodyCache::new(0);
        assert!(off.share(&Body::from(vec![1u8])).is_none());
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
