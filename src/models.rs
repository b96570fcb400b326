//! The embedding models this replica can run, and which of them new writes
//! use: the model the database marks active when this replica has it, else
//! the configured one. A reembed job switches the active model once every
//! event has an embedding for it; replicas follow within a supervisor tick,
//! and writes that race the switch leave a pending marker (see
//! `storage::write_events`), so no event is left without one.
use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use crate::{embedding::Embedder, error::CoreError, storage::ModelHandle};

#[derive(Clone)]
pub struct RunnableModel {
    pub handle: ModelHandle,
    pub embedder: Arc<Embedder>,
}

pub struct Models {
    by_name: HashMap<String, RunnableModel>,
    for_writes: RwLock<RunnableModel>,
}

impl Models {
    /// `default` writes until another model this replica has becomes active.
    pub fn new(default: RunnableModel, others: Vec<RunnableModel>) -> Self {
        let mut by_name: HashMap<String, RunnableModel> =
            others.into_iter().map(|m| (m.handle.name.clone(), m)).collect();
        by_name.insert(default.handle.name.clone(), default.clone());
        Models {
            by_name,
            for_writes: RwLock::new(default),
        }
    }

    pub fn named(&self, name: &str) -> Option<&RunnableModel> {
        self.by_name.get(name)
    }

    pub fn all(&self) -> impl Iterator<Item = &RunnableModel> {
        self.by_name.values()
    }

    pub fn for_writes(&self) -> RunnableModel {
        self.for_writes.read().expect("model lock").clone()
    }

    /// Follows the database's active model if this replica can run it.
    pub fn follow_active(&self, active: &ModelHandle) {
        let Some(model) = self.by_name.get(&active.name) else {
            return;
        };
        let mut current = self.for_writes.write().expect("model lock");
        if current.handle.name != model.handle.name {
            tracing::info!(from = %current.handle.name, to = %model.handle.name, "writes switch embedding model");
            *current = model.clone();
        }
    }

    pub fn runnable(&self, name: &str, field: &str) -> Result<&RunnableModel, CoreError> {
        self.named(name).ok_or_else(|| {
            CoreError::InvalidInput(crate::domain::Violations::single(
                field,
                format!("this server cannot embed with a model named {name:?}"),
            ))
        })
    }
}
