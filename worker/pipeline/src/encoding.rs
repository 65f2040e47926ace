//! How a destination encodes rows: its wire format and `typeMappings`
//! ([`PayloadEncoding`], [`TypeOverrides`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use wallaby_codec::{TableSchema, WireFormat};

/// A destination's encoding of a table group: the wire format and its `typeMappings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadEncoding {
    /// Wire format.
    pub format: WireFormat,
    /// `typeMappings` (PostgreSQL type name → destination type).
    pub type_mappings: BTreeMap<String, String>,
}

impl PayloadEncoding {
    /// `schema` with this encoding's type mappings applied.
    pub fn schema(&self, schema: &Arc<TableSchema>) -> Arc<TableSchema> {
        TypeOverrides::new(self.type_mappings.clone()).apply(schema)
    }
}

/// A destination's `typeMappings` (PostgreSQL type name → destination type), applied to
/// each table schema once per schema version.
#[derive(Debug, Clone, Default)]
pub struct TypeOverrides {
    mappings: BTreeMap<String, String>,
    cache: HashMap<(String, u32), Arc<TableSchema>>,
}

impl TypeOverrides {
    /// Overrides from a Destination's `typeMappings`.
    pub fn new(mappings: BTreeMap<String, String>) -> Self {
        Self {
            mappings,
            cache: HashMap::new(),
        }
    }

    /// The mappings.
    pub fn mappings(&self) -> &BTreeMap<String, String> {
        &self.mappings
    }

    /// The schema with each column's `mapped_type` set from the mappings (keyed by the
    /// column's PostgreSQL type name).
    pub fn apply(&mut self, schema: &Arc<TableSchema>) -> Arc<TableSchema> {
        if self.mappings.is_empty() {
            return schema.clone();
        }
        let key = (schema.qualified_name(), schema.version);
        if let Some(s) = self.cache.get(&key) {
            return s.clone();
        }
        let mut mapped = (**schema).clone();
        for column in &mut mapped.columns {
            column.mapped_type = self.mappings.get(&column.ty.name).cloned();
        }
        let mapped = Arc::new(mapped);
        self.cache.insert(key, mapped.clone());
        mapped
    }
}
