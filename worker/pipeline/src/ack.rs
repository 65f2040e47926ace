//! The ack tracker: per destination, the highest transaction end it made durable; from
//! those, the position the slot may confirm. `all` takes the minimum over every
//! destination, `primary` follows the primary alone. Positions only move forward, so a
//! late or repeated ack can never move the slot backward. Under `primary`, a secondary
//! that spools its batches to disk also *gates* the slot at its spool's end, so the slot
//! never passes what is neither at the secondary nor in its spool.

use crate::lsn::Lsn;

/// How destinations' durable positions combine into the slot's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// Every destination must have made a position durable.
    All,
    /// Only the destination at this index.
    Primary(usize),
}

/// Durable positions and the confirmed slot position derived from them.
#[derive(Debug, Clone)]
pub struct AckTracker {
    mode: AckMode,
    durable: Vec<Lsn>,
    /// Per destination: the end of its durable spool while it gates the slot.
    gates: Vec<Option<Lsn>>,
    confirmed: Lsn,
}

impl AckTracker {
    /// Starts every destination (and the slot) at `start`, the slot's confirmed position.
    pub fn new(mode: AckMode, destinations: usize, start: Lsn) -> Self {
        Self {
            mode,
            durable: vec![start; destinations],
            gates: vec![None; destinations],
            confirmed: start,
        }
    }

    /// Records that destination `index` made everything up to `lsn` durable. Returns the
    /// new slot position when it advanced.
    pub fn durable(&mut self, index: usize, lsn: Lsn) -> Option<Lsn> {
        if let Some(d) = self.durable.get_mut(index) {
            *d = (*d).max(lsn);
        }
        self.advance()
    }

    /// Records that secondary `index` holds everything up to `lsn` in its durable spool;
    /// from its first call the secondary gates the slot (`primary` mode only). Returns
    /// the new slot position when it advanced.
    pub fn spooled(&mut self, index: usize, lsn: Lsn) -> Option<Lsn> {
        if let Some(g) = self.gates.get_mut(index) {
            *g = Some(g.map_or(lsn, |g| g.max(lsn)));
        }
        self.advance()
    }

    /// Secondary `index` no longer gates the slot (it was detached). Returns the new slot
    /// position when it advanced.
    pub fn ungate(&mut self, index: usize) -> Option<Lsn> {
        if let Some(g) = self.gates.get_mut(index) {
            *g = None;
        }
        self.advance()
    }

    /// Sets the durable position of destination `index` as recovered at start (a
    /// secondary replaying its spool may be behind the slot).
    pub fn recovered(&mut self, index: usize, lsn: Lsn) {
        if let Some(d) = self.durable.get_mut(index) {
            *d = lsn;
        }
    }

    fn advance(&mut self) -> Option<Lsn> {
        let candidate = match self.mode {
            AckMode::All => self.durable.iter().copied().min().unwrap_or(self.confirmed),
            AckMode::Primary(p) => {
                let primary = self.durable.get(p).copied().unwrap_or(self.confirmed);
                self.gates.iter().flatten().copied().fold(primary, Lsn::min)
            }
        };
        if candidate > self.confirmed {
            self.confirmed = candidate;
            Some(candidate)
        } else {
            None
        }
    }

    /// Durable position of destination `index`.
    pub fn destination(&self, index: usize) -> Lsn {
        self.durable.get(index).copied().unwrap_or_default()
    }

    /// The slot position.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Whether destination `index` gates the slot.
    pub fn is_required(&self, index: usize) -> bool {
        match self.mode {
            AckMode::All => true,
            AckMode::Primary(p) => p == index,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_takes_the_minimum_and_never_moves_back() {
        let mut t = AckTracker::new(AckMode::All, 2, Lsn(100));
        assert_eq!(t.durable(0, Lsn(200)), None, "b is still at 100");
        assert_eq!(t.durable(1, Lsn(150)), Some(Lsn(150)));
        assert_eq!(t.durable(1, Lsn(120)), None, "a late ack cannot move back");
        assert_eq!(t.destination(1), Lsn(150));
        assert_eq!(t.durable(1, Lsn(300)), Some(Lsn(200)));
        assert_eq!(t.confirmed(), Lsn(200));
    }

    #[test]
    fn primary_follows_the_primary_alone() {
        let mut t = AckTracker::new(AckMode::Primary(1), 3, Lsn(10));
        assert_eq!(t.durable(0, Lsn(50)), None);
        assert_eq!(t.durable(1, Lsn(40)), Some(Lsn(40)));
        assert_eq!(
            t.destination(2),
            Lsn(10),
            "a secondary keeps its own position"
        );
        assert!(t.is_required(1) && !t.is_required(0));
    }

    #[test]
    fn a_spooled_secondary_gates_the_slot_until_it_is_detached() {
        let mut t = AckTracker::new(AckMode::Primary(0), 2, Lsn(10));
        assert_eq!(t.spooled(1, Lsn(30)), None, "the primary is still at 10");
        assert_eq!(
            t.durable(0, Lsn(50)),
            Some(Lsn(30)),
            "held at the spool's end"
        );
        assert_eq!(t.spooled(1, Lsn(40)), Some(Lsn(40)));
        assert_eq!(t.ungate(1), Some(Lsn(50)), "detached: the primary alone");
        assert_eq!(t.destination(1), Lsn(10), "its own position is unchanged");
    }
}
