//! Logging that a guest can trigger must not flood the host's logs.

/// Counts occurrences and says when one is worth logging: the 1st, 2nd,
/// 4th, 8th, … so a flood costs O(log n) lines.
#[derive(Debug, Default)]
pub struct LogLimiter {
    count: u64,
}

impl LogLimiter {
    /// Records one occurrence; true if this one should be logged.
    pub fn hit(&mut self) -> bool {
        self.count += 1;
        self.count.is_power_of_two()
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_powers_of_two() {
        let mut l = LogLimiter::default();
        let logged: Vec<u64> = (1..=20).filter(|_| l.hit()).collect();
        assert_eq!(logged.len(), 5); // 1, 2, 4, 8, 16
        assert_eq!(l.count(), 20);
    }
}
