//! The bodies this node just stored, for their first delivery
//! (`delivery.body_cache`): a message is usually delivered moments after
//! it was accepted, and its body is then still in memory here. Reading it
//! back from the spool costs a thread hand-off and a read on the local
//! spool, and a round trip that carries the whole body on Redis.
//!
//! The cache shares each body's bytes with the store that wrote them (a
//! [`Body`] clone), so keeping it costs no copy.
//!
//! Bounded in bytes. Deliveries take bodies about in the order they were
//! kept, so when the cache is full it makes room from the bodies older
//! than one already taken (passed over: delivered by another node, or
//! retried, or their message deleted), and otherwise keeps no more: the
//! bodies it holds are the next to be delivered. Dropping the oldest
//! instead, as it once did, meant that once more messages waited than
//! the cache holds, every delivery found its body just dropped (2,392
//! misses in 2,409 reads, 200 sessions of 100 KB messages on Redis). A
//! delivery takes its body; a message with several deliveries, one
//! retried or one taken by another node reads the spool as before.
//! Bodies are never changed once stored, so a kept body is never stale.

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
    /// Each body with its place in the order it was kept.
    bodies: HashMap<MessageId, (u64, Body)>,
    /// Places and ids in the order kept; an id whose body was taken stays
    /// until it comes up.
    order: VecDeque<(u64, MessageId)>,
    /// The place the next body kept gets.
    next: u64,
    /// The latest place of a body taken: kept bodies before it were
    /// passed over.
    taken: u64,
    /// The memory of the kept bodies ([`Body::held`]).
    bytes: u64,
}

impl State {
    /// Drops bodies passed over, oldest first, until `room` more bytes fit
    /// in `capacity` or none is left to drop; whether they fit.
    fn make_room(&mut self, room: u64, capacity: u64) -> bool {
        while self.bytes + room > capacity {
            let Some((place, id)) = self.order.front() else {
                break;
            };
            // Not so when its body was taken, or kept again later.
            let kept_here = self.bodies.get(id).is_some_and(|(kept, _)| kept == place);
            if kept_here && *place >= self.taken {
                break;
            }
            let (_, id) = self.order.pop_front().expect("a front");
            if kept_here {
                let (_, body) = self.bodies.remove(&id).expect("kept");
                self.bytes -= body.held() as u64;
            }
        }
        self.bytes + room <= capacity
    }
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

    /// Keeps the bodies of stored messages, as many as fit once the bodies
    /// passed over are dropped.
    pub fn keep(&self, bodies: impl IntoIterator<Item = (MessageId, Body)>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (id, body) in bodies {
            let held = body.held() as u64;
            if let Some((_, old)) = state.bodies.remove(&id) {
                state.bytes -= old.held() as u64;
            }
            if !state.make_room(held, self.capacity) {
                continue;
            }
            let place = state.next;
            state.next += 1;
            state.bytes += held;
            state.bodies.insert(id.clone(), (place, body));
            state.order.push_back((place, id));
        }
        // Places of taken bodies pile up only while nothing is dropped.
        if state.order.len() > 2 * state.bodies.len() + 1024 {
            let State { bodies, order, .. } = &mut *state;
            order.retain(|(place, id)| bodies.get(id).is_some_and(|(kept, _)| kept == place));
        }
        crate::metrics::body_cache(state.bytes);
    }

    /// Drops the kept bodies of `ids` without reading them: their store
    /// failed, and no delivery will ask for them.
    pub fn discard(&self, ids: &[MessageId]) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if let Some((_, body)) = state.bodies.remove(id) {
                state.bytes -= body.held() as u64;
            }
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
        let (place, body) = body?;
        state.taken = state.taken.max(place);
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
        assert!(cache.take(&id(2)).is_none(), "128 bytes held, 20 received");
        assert!(cache.take(&id(1)).is_some());
    }

    #[test]
    fn past_the_capacity_the_newest_are_not_kept_and_the_passed_over_go_first() {
        let cache = BodyCache::new(100);
        for n in 1..=4 {
            keep(&cache, n, 30);
        }
        // 120 bytes: the fourth did not fit; the first three are the next
        // to be delivered.
        assert!(cache.take(&id(4)).is_none());
        assert!(cache.take(&id(1)).is_some());
        // A taken body frees its room.
        keep(&cache, 5, 30);
        // 3 is taken before 2: 2 was passed over, and makes room for 6.
        assert!(cache.take(&id(3)).is_some());
        keep(&cache, 6, 30);
        keep(&cache, 7, 30);
        assert!(cache.take(&id(2)).is_none(), "passed over, dropped");
        for n in [5, 6, 7] {
            assert!(cache.take(&id(n)).is_some(), "{n}");
        }
        assert_eq!(cache.state.lock().unwrap().bytes, 0);
    }

    /// Once more messages wait than the cache holds, deliveries in the
    /// order of storing still find most bodies kept.
    #[test]
    fn a_backlog_larger_than_the_cache_is_delivered_from_it_as_far_as_it_goes() {
        let cache = BodyCache::new(100 * 10);
        let mut hits = 0;
        let mut delivered = 0;
        // 5 stored for each 2 delivered, 500 in all, then the rest.
        for n in 0..500u64 {
            keep(&cache, n, 10);
            if n % 5 < 2 {
                hits += usize::from(cache.take(&id(delivered)).is_some());
                delivered += 1;
            }
        }
        while delivered < 500 {
            hits += usize::from(cache.take(&id(delivered)).is_some());
            delivered += 1;
        }
        // Every body kept is taken: the 100 it holds at first, then one
        // for each taken while the backlog grows.
        assert!(hits >= 250, "{hits} of 500");
        assert_eq!(cache.state.lock().unwrap().bytes, 0);
    }

    #[test]
    fn a_discarded_body_is_gone_and_its_room_free() {
        let cache = BodyCache::new(100);
        keep(&cache, 1, 60);
        keep(&cache, 2, 60);
        assert!(cache.take(&id(2)).is_none(), "no room for the second");
        cache.discard(&[id(1), id(9)]);
        assert!(cache.take(&id(1)).is_none());
        keep(&cache, 3, 60);
        assert_eq!(cache.take(&id(3)).unwrap().len(), 60);
    }

    #[test]
    fn a_body_kept_again_replaces_the_first() {
        let cache = BodyCache::new(100);
        keep(&cache, 1, 30);
        keep(&cache, 1, 50);
        assert_eq!(cache.state.lock().unwrap().bytes, 50);
        assert_eq!(cache.take(&id(1)).unwrap().len(), 50);
        assert_eq!(cache.state.lock().unwrap().bytes, 0);
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
