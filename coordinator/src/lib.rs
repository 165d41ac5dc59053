//! The smarthost control plane: node membership, reclaiming the work of dead
//! nodes, promoting due retries and the cluster-wide admin API. It is built
//! with the Redis queue; a single node runs without it.
