//! The `[gateways]` table class 4 redirects resolve gateway ids with, replaced whole on reload.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

/// Gateway id → SIP URI. Cheap to clone; every clone sees a reload. A run takes the table as
/// it is when its script ends, so a reload never mixes two tables in one answer.
#[derive(Clone, Default)]
pub struct Gateways(Arc<RwLock<Arc<BTreeMap<String, String>>>>);

impl Gateways {
    pub fn new(table: BTreeMap<String, String>) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(table))))
    }

    /// The table in force now.
    pub fn current(&self) -> Arc<BTreeMap<String, String>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `table` in force for every answer decided from now on.
    pub fn replace(&self, table: BTreeMap<String, String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_see_a_replacement_and_a_taken_table_stays_whole() {
        let a = Gateways::new(BTreeMap::from([("x".into(), "sip:old.example".into())]));
        let b = a.clone();
        let taken = b.current();
        a.replace(BTreeMap::from([("y".into(), "sip:new.example".into())]));
        assert_eq!(taken.get("x").map(String::as_str), Some("sip:old.example"));
        let now = b.current();
        assert!(now.get("x").is_none());
        assert_eq!(now.get("y").map(String::as_str), Some("sip:new.example"));
    }
}
