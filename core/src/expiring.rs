//! Keys remembered until a deadline, in a bounded map: what a plane keeps
//! about callers it cannot trust to be few (tokens a store did not know,
//! tokens a control plane vouched for). Past its bound it forgets the
//! expired keys, then — if they were all live — everything: each is asked
//! about again, which costs a lookup, never a wrong answer. The clock is
//! passed in (milliseconds or an `Instant`), as for the other books.

use std::collections::HashMap;

#[derive(Debug)]
pub struct Expiring<T> {
    until: HashMap<String, T>,
    max: usize,
}

impl<T: Ord + Copy> Expiring<T> {
    pub fn new(max: usize) -> Self {
        Self {
            until: HashMap::new(),
            max,
        }
    }

    /// Whether `key` is remembered at `now`.
    pub fn contains(&self, key: &str, now: T) -> bool {
        self.until.get(key).is_some_and(|until| *until > now)
    }

    /// Remembers `key` until `until`.
    pub fn insert(&mut self, key: &str, until: T, now: T) {
        if self.until.len() >= self.max {
            self.until.retain(|_, u| *u > now);
            if self.until.len() >= self.max {
                self.until.clear();
            }
        }
        self.until.insert(key.to_string(), until);
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_expire_and_the_map_stays_bounded() {
        let mut e = Expiring::new(3);
        e.insert("a", 10, 0);
        assert!(e.contains("a", 9) && !e.contains("a", 10));
        e.insert("b", 20, 0);
        e.insert("c", 20, 0);
        e.insert("d", 20, 15); // "a" expired: dropped to make room
        assert_eq!(e.len(), 3);
        e.insert("e", 30, 15); // all live: forgotten at once
        assert_eq!(e.len(), 1);
        assert!(e.contains("e", 15) && !e.contains("b", 15));
    }
}
