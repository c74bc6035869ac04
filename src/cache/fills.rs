//! The memory that fills in progress hold, all together (`[cache] fill_memory`). A fill keeps
//! the body it is storing until the body ends (the disk tier writes a record whole, the
//! memory tier publishes a body whole), so each holds up to the largest object it may store:
//! without a bound, clients asking at once for many large objects that are not yet stored (a
//! wiki's media files, its dumps) made the process hold their sum, past any memory an
//! operator sized for (30 fills of 40 MiB: 960 MiB resident with `memory_size` at 256 MiB).
//! A fill that would take the total past the bound stops keeping its body: the response
//! streams on to its client, unstored, and the next request for the URL fills again.
//!
//! It owns the count and the bound; it does not decide what a fill keeps (`proxy`'s two miss
//! paths ask it before keeping a piece) nor what is stored (the tiers).

use std::sync::atomic::{AtomicUsize, Ordering};

/// The bytes of response bodies that fills in progress hold, and their bound.
pub struct FillBudget {
    held: AtomicUsize,
    limit: AtomicUsize,
}

impl FillBudget {
    pub fn new(limit: usize) -> FillBudget {
        FillBudget {
            held: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
        }
    }

    /// A reload's new bound: fills already holding more keep it, new pieces wait for room.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes held by fills in progress now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The bound (`[cache] fill_memory`).
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// What one fill holds of the budget, given back when it is dropped.
    pub fn hold(&'static self) -> FillHold {
        FillHold {
            budget: self,
            bytes: 0,
            refused: false,
        }
    }
}

/// One fill's share of the [`FillBudget`].
pub struct FillHold {
    budget: &'static FillBudget,
    bytes: usize,
    refused: bool,
}

impl FillHold {
    /// Takes `n` more bytes for this fill. `false` once the budget had no room for a piece:
    /// the fill must drop what it kept (this hold has given it back already) and keep nothing
    /// more, since a body with a piece missing cannot be stored.
    pub fn grow(&mut self, n: usize) -> bool {
        if self.refused {
            return false;
        }
        let limit = self.budget.limit.load(Ordering::Relaxed);
        let taken = self
            .budget
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(n).filter(|&total| total <= limit)
            });
        if taken.is_ok() {
            self.bytes += n;
            return true;
        }
        self.release();
        self.refused = true;
        false
    }

    /// Whether a piece was refused: the fill stores nothing.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// Gives back what this fill holds (its body was stored, or dropped).
    pub fn release(&mut self) {
        if self.bytes > 0 {
            self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
            self.bytes = 0;
        }
    }
}

impl Drop for FillHold {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: usize) -> &'static FillBudget {
        Box::leak(Box::new(FillBudget::new(limit)))
    }

    #[test]
    fn fills_share_the_bound_and_a_refused_fill_gives_back_what_it_held() {
        let budget = budget(100);
        let mut a = budget.hold();
        let mut b = budget.hold();
        assert!(a.grow(60));
        assert!(b.grow(30));
        assert_eq!(budget.held(), 90);
        // b's next piece does not fit: b drops everything it kept, and so gives it back.
        assert!(!b.grow(20));
        assert!(b.refused());
        assert_eq!(budget.held(), 60);
        // Refused for good: a body with a piece missing cannot be stored.
        assert!(!b.grow(1));
        assert!(a.grow(40));
        assert_eq!(budget.held(), 100);
        drop(a);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_lowered_bound_refuses_new_pieces_and_keeps_what_fills_hold() {
        let budget = budget(100);
        let mut a = budget.hold();
        assert!(a.grow(80));
        budget.set_limit(50);
        assert_eq!(budget.held(), 80);
        let mut b = budget.hold();
        assert!(!b.grow(1));
        a.release();
        assert_eq!(budget.held(), 0);
        assert!(budget.hold().grow(50));
    }
}
