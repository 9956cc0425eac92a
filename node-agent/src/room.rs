//! Room on the checkpoint store's disk held for streams being received: an archive is admitted
//! only if it fits in what is free minus what other streams hold, so that two receives at once
//! cannot both count the same free bytes. A hold is given back when its stream ends, whatever
//! the outcome (what was written is then on the disk and counted by the file system itself).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

/// The holds of one agent.
#[derive(Debug, Default, Clone)]
pub struct Room {
    held: Arc<Mutex<HashMap<u64, u64>>>,
    next: Arc<Mutex<u64>>,
}

/// Room that did not suffice: what was free and what other streams held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short {
    pub free: u64,
    pub held: u64,
}

/// Room held for one stream until dropped.
#[derive(Debug)]
pub struct Hold {
    room: Room,
    id: u64,
}

impl Room {
    /// Holds `bytes` if they fit in `free` besides what the other holds keep.
    pub fn hold(&self, bytes: u64, free: u64) -> Result<Hold, Short> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let others: u64 = held.values().sum();
        if bytes > free.saturating_sub(others) {
            return Err(Short { free, held: others });
        }
        let id = {
            let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            *next += 1;
            *next
        };
        held.insert(id, bytes);
        Ok(Hold {
            room: self.clone(),
            id,
        })
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.room
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_streams_cannot_count_the_same_free_bytes_and_a_hold_ends_with_its_stream() {
        let room = Room::default();
        let first = room.hold(600, 1000).unwrap();
        assert_eq!(
            room.hold(600, 1000).unwrap_err(),
            Short {
                free: 1000,
                held: 600
            }
        );
        let second = room.hold(400, 1000).unwrap();
        assert_eq!(room.held(), 1000);
        drop(first);
        drop(second);
        assert_eq!(room.held(), 0);
        assert!(room.hold(1000, 1000).is_ok());
    }
}
