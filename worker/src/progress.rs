//! Snapshot progress as the worker prints it: a line per table (logs, `backfill` on a
//! pipe) and a bar (`backfill` on a terminal).

use wallaby_crds::flow::TableSnapshotProgress;

/// `snapshot public.items: Copying, 12000 rows, 3/8 partitions`.
pub fn line(t: &TableSnapshotProgress) -> String {
    format!(
        "snapshot {}: {}, {} rows, {}/{} partitions",
        t.table, t.state, t.rows_copied, t.partitions_done, t.partitions_total
    )
}

/// `[#######.............] 12/40 partitions, 2/3 tables done, 120000 rows`.
pub fn bar(tables: &[TableSnapshotProgress]) -> String {
    const WIDTH: u32 = 30;
    let total: u32 = tables.iter().map(|t| t.partitions_total).sum();
    let done: u32 = tables.iter().map(|t| t.partitions_done).sum();
    let rows: u64 = tables.iter().map(|t| t.rows_copied).sum();
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    format!(
        "[{}{}] {done}/{total} partitions, {}/{} tables done, {rows} rows",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize),
        tables.iter().filter(|t| t.state == "Done").count(),
        tables.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_renders_as_a_bar_and_as_lines() {
        let t = TableSnapshotProgress {
            table: "public.items".into(),
            state: "Copying".into(),
            rows_copied: 120,
            partitions_done: 1,
            partitions_total: 3,
        };
        assert_eq!(
            line(&t),
            "snapshot public.items: Copying, 120 rows, 1/3 partitions"
        );
        assert_eq!(
            bar(&[t]),
            "[##########....................] 1/3 partitions, 0/1 tables done, 120 rows"
        );
    }
}
