//! Answers to a batch in its items' order, when some items are answered
//! early (refused by a check) and the rest together (one ledger job).

/// One slot per item, each filled once.
pub struct InOrder<T>(Vec<Option<T>>);

impl<T> InOrder<T> {
    pub fn new(items: usize) -> Self {
        Self((0..items).map(|_| None).collect())
    }

    pub fn put(&mut self, item: usize, answer: T) {
        self.0[item] = Some(answer);
    }

    /// Every answer, in order. Panics if an item was left unanswered: a
    /// batch that drops an item is a bug, never a result.
    pub fn done(self) -> Vec<T> {
        self.0
            .into_iter()
            .enumerate()
            .map(|(i, a)| a.unwrap_or_else(|| panic!("item {i} of a batch was not answered")))
            .collect()
    }
}
