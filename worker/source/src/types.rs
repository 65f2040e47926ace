//! PostgreSQL type resolution: built-in OIDs from a static table, everything else (enums,
//! domains, composites, ranges, arrays, extension types) through `pg_type` and friends on
//! the catalog connection, cached per (OID, typmod). Feeds [`TableSchema`]s to the codec.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_postgres::Client;
use wallaby_codec::{ColumnSchema, TableSchema, TypeInfo, TypeKind, builtin_type};

use super::SourceError;
use wallaby_pipeline::change::Relation;

/// Extension types recognised by `typname` in any schema.
fn extension_kind(typname: &str) -> Option<TypeKind> {
    Some(match typname {
        "citext" => TypeKind::Text,
        "hstore" => TypeKind::Hstore,
        "ltree" => TypeKind::Ltree,
        "vector" => TypeKind::Vector,
        "geometry" => TypeKind::Geometry,
        "geography" => TypeKind::Geography,
        _ => return None,
    })
}

/// `pg_type` facts about one type.
struct PgType {
    name: String,
    typname: String,
    typtype: i8,
    typelem: u32,
    typbasetype: u32,
    typtypmod: i32,
    typrelid: u32,
    typcategory: i8,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Resolves type OIDs to [`TypeInfo`]s, cached by (OID, typmod) for the life of the
/// worker. Enum labels added later (`ALTER TYPE … ADD VALUE`) need no refresh: enum values
/// decode as their label whatever the cached list says.
pub struct TypeResolver {
    client: Arc<Client>,
    resolve_types: bool,
    cache: HashMap<(u32, i32), Arc<TypeInfo>>,
}

impl std::fmt::Debug for TypeResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypeResolver")
            .field("resolve_types", &self.resolve_types)
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl TypeResolver {
    /// `resolve_types` off: built-in types only, every other type is
    /// [`TypeKind::Unknown`] and keeps PostgreSQL's text.
    pub fn new(client: Arc<Client>, resolve_types: bool) -> Self {
        Self {
            client,
            resolve_types,
            cache: HashMap::new(),
        }
    }

    /// Drops every cached type, so the next lookups read the catalog again (after a
    /// relation changed shape, say: an altered composite or enum is then re-read).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    /// The type of `oid` with modifier `typmod`.
    pub async fn resolve(&mut self, oid: u32, typmod: i32) -> Result<Arc<TypeInfo>, SourceError> {
        self.resolve_boxed(oid, typmod).await
    }

    /// The codec's schema of a relation; `version` is the caller's schema version.
    pub async fn table_schema(
        &mut self,
        relation: &Relation,
        version: u32,
    ) -> Result<TableSchema, SourceError> {
        let mut columns = Vec::with_capacity(relation.columns.len());
        for (i, col) in relation.columns.iter().enumerate() {
            columns.push(ColumnSchema {
                name: col.name.clone(),
                ty: self.resolve(col.type_oid, col.type_modifier).await?,
                key: relation.key.contains(&i),
                mapped_type: None,
            });
        }
        Ok(TableSchema {
            schema: relation.schema.clone(),
            table: relation.table.clone(),
            columns,
            version,
        })
    }

    // Boxed because composites, domains, ranges and arrays resolve their parts recursively.
    fn resolve_boxed(
        &mut self,
        oid: u32,
        typmod: i32,
    ) -> BoxFuture<'_, Result<Arc<TypeInfo>, SourceError>> {
        Box::pin(async move {
            if let Some(t) = self.cache.get(&(oid, typmod)) {
                return Ok(t.clone());
            }
            let info = match builtin_type(oid, typmod) {
                Some(t) => t,
                None => self.lookup(oid, typmod).await?,
            };
            let info = Arc::new(info);
            self.cache.insert((oid, typmod), info.clone());
            Ok(info)
        })
    }

    async fn lookup(&mut self, oid: u32, typmod: i32) -> Result<TypeInfo, SourceError> {
        let t = self.pg_type(oid).await?;
        let unknown = |t: PgType| TypeInfo {
            oid,
            name: t.name,
            typmod,
            kind: TypeKind::Unknown,
        };
        if !self.resolve_types {
            return Ok(unknown(t));
        }
        let kind = match t.typtype as u8 {
            b'b' if t.typcategory as u8 == b'A' && t.typelem != 0 => {
                TypeKind::Array(self.resolve_boxed(t.typelem, typmod).await?)
            }
            b'b' => match extension_kind(&t.typname) {
                Some(kind) => kind,
                None => return Ok(unknown(t)),
            },
            b'e' => TypeKind::Enum(self.enum_labels(oid).await?),
            b'd' => TypeKind::Domain(self.resolve_boxed(t.typbasetype, t.typtypmod).await?),
            b'c' => TypeKind::Composite(self.attributes(t.typrelid, &t.name).await?),
            b'r' => {
                let subtype: u32 = self
                    .client
                    .query_one(
                        "SELECT rngsubtype FROM pg_range WHERE rngtypid = $1",
                        &[&oid],
                    )
                    .await
                    .map_err(SourceError::query(format!(
                        "reading the subtype of range type {}",
                        t.name
                    )))?
                    .get(0);
                TypeKind::Range(self.resolve_boxed(subtype, -1).await?)
            }
            // Multiranges and pseudo-types keep PostgreSQL's text.
            _ => return Ok(unknown(t)),
        };
        Ok(TypeInfo {
            oid,
            name: t.name,
            typmod,
            kind,
        })
    }

    async fn pg_type(&self, oid: u32) -> Result<PgType, SourceError> {
        let row = self
            .client
            .query_opt(
                "SELECT t.typname::text, n.nspname::text, t.typtype, t.typelem, t.typbasetype, \
                 t.typtypmod, t.typrelid, t.typcategory \
                 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1",
                &[&oid],
            )
            .await
            .map_err(SourceError::query(format!("looking up type OID {oid} in pg_type")))?
            .ok_or_else(|| {
                SourceError::Catalog(format!(
                    "type OID {oid} of a replicated column is not in pg_type (dropped while streaming?); restart the worker to re-read the table"
                ))
            })?;
        let typname: String = row.get(0);
        let nspname: String = row.get(1);
        Ok(PgType {
            name: if nspname == "pg_catalog" {
                typname.clone()
            } else {
                format!("{nspname}.{typname}")
            },
            typname,
            typtype: row.get(2),
            typelem: row.get(3),
            typbasetype: row.get(4),
            typtypmod: row.get(5),
            typrelid: row.get(6),
            typcategory: row.get(7),
        })
    }

    async fn enum_labels(&self, oid: u32) -> Result<Vec<String>, SourceError> {
        let rows = self
            .client
            .query(
                "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder",
                &[&oid],
            )
            .await
            .map_err(SourceError::query(format!(
                "reading the labels of enum type OID {oid}"
            )))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn attributes(
        &mut self,
        relid: u32,
        type_name: &str,
    ) -> Result<Vec<(String, Arc<TypeInfo>)>, SourceError> {
        let rows = self
            .client
            .query(
                "SELECT attname::text, atttypid, atttypmod FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&relid],
            )
            .await
            .map_err(SourceError::query(format!(
                "reading the attributes of composite type {type_name}"
            )))?;
        let mut fields = Vec::with_capacity(rows.len());
        for row in rows {
            let name: String = row.get(0);
            let ty = self.resolve_boxed(row.get(1), row.get(2)).await?;
            fields.push((name, ty));
        }
        Ok(fields)
    }
}
