//! What the actors of one node share: services a node starts once and every actor on it uses
//! (the policy actors' inference worker, which batches the chunks of every robot the node
//! serves). Scoped to the node — created with it, dropped with it — so two nodes in one process
//! share nothing, and nothing here is a process-wide global.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The node's shared services, by name.
#[derive(Clone, Default)]
pub struct NodeServices(Arc<Mutex<HashMap<String, Arc<dyn Any + Send + Sync>>>>);

impl NodeServices {
    /// The service called `name`, started by `start` if this node has none yet. A service of
    /// another type under the same name is an error naming it.
    pub fn get_or_start<T: Any + Send + Sync>(
        &self,
        name: &str,
        start: impl FnOnce() -> Result<T, String>,
    ) -> Result<Arc<T>, String> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(name) {
            return s
                .clone()
                .downcast::<T>()
                .map_err(|_| format!("node service {name:?} is of another type"));
        }
        let s = Arc::new(start()?);
        map.insert(name.to_string(), s.clone());
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_is_started_once_per_node() {
        let (a, b) = (NodeServices::default(), NodeServices::default());
        let mut starts = 0;
        let x = a
            .get_or_start("w", || {
                starts += 1;
                Ok(7u32)
            })
            .unwrap();
        let y = a
            .get_or_start("w", || {
                starts += 1;
                Ok(8u32)
            })
            .unwrap();
        assert!(Arc::ptr_eq(&x, &y));
        assert_eq!(starts, 1);
        assert_eq!(
            *b.get_or_start("w", || Ok(9u32)).unwrap(),
            9,
            "another node has its own"
        );
        assert!(a
            .get_or_start::<String>("w", || Ok(String::new()))
            .unwrap_err()
            .contains("\"w\""));
        assert!(a.get_or_start::<u8>("e", || Err("no".into())).is_err());
    }
}
