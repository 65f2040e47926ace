//! The six throughput workloads: the table each creates, the SQL that generates its
//! changes server-side (procedures that COMMIT in a loop, so the client is never the
//! bottleneck) and the exact number of row changes each produces at a given scale.

use std::fmt;
use std::str::FromStr;

/// A workload: one table `t` in its own database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    Insert10kTx,
    SingleRowTx,
    Mixed,
    WideRows,
    OneBigTx,
    ToastUpdates,
}

pub const ALL: [Workload; 6] = [
    Workload::Insert10kTx,
    Workload::SingleRowTx,
    Workload::Mixed,
    Workload::WideRows,
    Workload::OneBigTx,
    Workload::ToastUpdates,
];

/// The SQL of one workload at one scale.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Table, procedures and (for toast-updates) the rows the updates touch; run before
    /// the slots exist, so none of it is measured.
    pub setup: Vec<String>,
    /// Statements generating the measured changes, each sent alone (a CALL that COMMITs
    /// must be the only statement of its query).
    pub generate: Vec<String>,
    /// Row changes (inserts + updates + deletes) the statements produce.
    pub changes: u64,
    /// Transactions the statements commit.
    pub transactions: u64,
    /// One line for the report: what the changes are.
    pub description: String,
}

/// `base * scale`, rounded, at least `min`.
fn scaled(base: u64, scale: f64, min: u64) -> u64 {
    ((base as f64 * scale).round() as u64).max(min)
}

const NARROW_TABLE: &str =
    "CREATE TABLE t (id bigserial PRIMARY KEY, k int, v text, ts timestamptz)";

/// Inserts `total` narrow rows, committing every `per_tx`.
const INSERT_PROC: &str = r#"
CREATE PROCEDURE gen_inserts(total bigint, per_tx bigint) LANGUAGE plpgsql AS $$
DECLARE done bigint := 0; n bigint;
BEGIN
  WHILE done < total LOOP
    n := least(per_tx, total - done);
    INSERT INTO t (k, v, ts)
      SELECT (done + g)::int, md5((done + g)::text), now() FROM generate_series(1, n) g;
    done := done + n;
    COMMIT;
  END LOOP;
END $$"#;

fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b.max(1))
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Self::Insert10kTx => "insert-10k-tx",
            Self::SingleRowTx => "single-row-tx",
            Self::Mixed => "mixed",
            Self::WideRows => "wide-rows",
            Self::OneBigTx => "one-big-tx",
            Self::ToastUpdates => "toast-updates",
        }
    }

    /// Database name (also the prefix of its slots, which are cluster-wide).
    pub fn database(self) -> String {
        format!("bench_{}", self.name().replace('-', "_"))
    }

    pub fn plan(self, scale: f64) -> Plan {
        match self {
            Self::Insert10kTx => {
                let rows = scaled(1_000_000, scale, 100);
                Plan {
                    setup: vec![NARROW_TABLE.into(), INSERT_PROC.into()],
                    generate: vec![format!("CALL gen_inserts({rows}, 10000)")],
                    changes: rows,
                    transactions: div_ceil(rows, 10_000),
                    description: format!("{rows} narrow inserts, 10k rows per transaction"),
                }
            }
            Self::SingleRowTx => {
                let rows = scaled(200_000, scale, 100);
                Plan {
                    setup: vec![NARROW_TABLE.into(), INSERT_PROC.into()],
                    generate: vec![format!("CALL gen_inserts({rows}, 1)")],
                    changes: rows,
                    transactions: rows,
                    description: format!("{rows} single-row insert transactions"),
                }
            }
            Self::Mixed => {
                // 1,000 changes per transaction: 600 inserts, 300 updates of the previous
                // transaction's rows, 100 deletes of other rows of it.
                let iterations = scaled(300, scale, 1);
                Plan {
                    setup: vec![
                        "CREATE TABLE t (id bigint PRIMARY KEY, k int, v text, ts timestamptz)"
                            .into(),
                        r#"
CREATE PROCEDURE gen_mixed(iterations int) LANGUAGE plpgsql AS $$
DECLARE base bigint; prev bigint; del_lo bigint;
BEGIN
  FOR j IN 0 .. iterations - 1 LOOP
    base := j::bigint * 600;
    prev := CASE WHEN j = 0 THEN 0 ELSE (j - 1)::bigint * 600 END;
    del_lo := CASE WHEN j = 0 THEN 500 ELSE prev + 400 END;
    INSERT INTO t SELECT base + g, g, md5((base + g)::text), now() FROM generate_series(1, 600) g;
    UPDATE t SET k = k + 1, v = md5(v), ts = now() WHERE id > prev AND id <= prev + 300;
    DELETE FROM t WHERE id > del_lo AND id <= del_lo + 100;
    COMMIT;
  END LOOP;
END $$"#
                            .into(),
                    ],
                    generate: vec![format!("CALL gen_mixed({iterations})")],
                    changes: iterations * 1000,
                    transactions: iterations,
                    description: format!(
                        "{} changes (60% insert, 30% update, 10% delete), 1k per transaction",
                        iterations * 1000
                    ),
                }
            }
            Self::WideRows => {
                let rows = scaled(200_000, scale, 100);
                Plan {
                    setup: vec![
                        "CREATE TABLE t (id bigserial PRIMARY KEY, k int, a text, b text, ts timestamptz)".into(),
                        // Two 800-character columns: ~1.6 KB rows, below the 2 KB TOAST
                        // threshold, so they stay inline and uncompressed.
                        r#"
CREATE PROCEDURE gen_wide(total bigint, per_tx bigint) LANGUAGE plpgsql AS $$
DECLARE done bigint := 0; n bigint;
BEGIN
  WHILE done < total LOOP
    n := least(per_tx, total - done);
    INSERT INTO t (k, a, b, ts)
      SELECT (done + g)::int,
             rpad(md5((done + g)::text), 800, md5((done + g + 1)::text)),
             rpad(md5((done + g + 2)::text), 800, md5((done + g + 3)::text)),
             now()
      FROM generate_series(1, n) g;
    done := done + n;
    COMMIT;
  END LOOP;
END $$"#
                            .into(),
                    ],
                    generate: vec![format!("CALL gen_wide({rows}, 10000)")],
                    changes: rows,
                    transactions: div_ceil(rows, 10_000),
                    description: format!("{rows} ~1.6 KB inserts, 10k rows per transaction"),
                }
            }
            Self::OneBigTx => {
                let rows = scaled(1_000_000, scale, 100);
                Plan {
                    setup: vec![NARROW_TABLE.into()],
                    generate: vec![format!(
                        "INSERT INTO t (k, v, ts) SELECT g, md5(g::text), now() FROM generate_series(1, {rows}) g"
                    )],
                    changes: rows,
                    transactions: 1,
                    description: format!("{rows} narrow inserts in one transaction"),
                }
            }
            Self::ToastUpdates => {
                // `rows` rows with a 9,600-byte out-of-line value (STORAGE EXTERNAL: not
                // compressed), then every row updated twice: once leaving the TOAST
                // column unchanged (pgoutput sends it as "unchanged"), once replacing it.
                let rows = scaled(25_000, scale, 50);
                Plan {
                    setup: vec![
                        "CREATE TABLE t (id int PRIMARY KEY, k int, big text)".into(),
                        "ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL".into(),
                        format!(
                            "INSERT INTO t SELECT g, 0, repeat(md5(g::text), 300) FROM generate_series(1, {rows}) g"
                        ),
                        r#"
CREATE PROCEDURE gen_toast(total int, per_tx int) LANGUAGE plpgsql AS $$
DECLARE lo int := 1;
BEGIN
  WHILE lo <= total LOOP
    UPDATE t SET k = k + 1 WHERE id >= lo AND id < lo + per_tx;
    COMMIT;
    lo := lo + per_tx;
  END LOOP;
  lo := 1;
  WHILE lo <= total LOOP
    UPDATE t SET k = k + 1, big = repeat(md5((id + 7)::text), 300)
      WHERE id >= lo AND id < lo + per_tx;
    COMMIT;
    lo := lo + per_tx;
  END LOOP;
END $$"#
                            .into(),
                    ],
                    generate: vec![format!("CALL gen_toast({rows}, 1000)")],
                    changes: rows * 2,
                    transactions: div_ceil(rows, 1000) * 2,
                    description: format!(
                        "{} updates of rows with a 9.6 KB TOASTed value: half leave it unchanged, half replace it; 1k per transaction",
                        rows * 2
                    ),
                }
            }
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL.into_iter().find(|w| w.name() == s).ok_or_else(|| {
            format!(
                "unknown workload {s:?}: expected one of {}",
                ALL.map(Workload::name).join(", ")
            )
        })
    }
}
