//! Reading a loss report (the DR's JSON) back, for `ordinal failover` and the demo's checks.
//! The report's shape is fixed by `LossReport::to_json`: flat numbers and one array of flat
//! objects, so a small field scanner is enough and every field is required.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostEntry {
    pub seq: u64,
    pub volume_offset: u64,
    pub len: u64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LossSummary {
    pub old_epoch: u64,
    pub new_epoch: u64,
    pub aux_table_read: bool,
    pub applied_before: u64,
    pub cut: u64,
    pub applied_from_ring: u64,
    pub applied_landed: u64,
    pub held_through: u64,
    pub lost: Vec<LostEntry>,
}

fn number(text: &str, key: &str) -> Result<u64, String> {
    let pattern = format!("\"{key}\":");
    let at = text
        .find(&pattern)
        .ok_or_else(|| format!("loss report lacks {key}"))?;
    let rest = &text[at + pattern.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .map_err(|_| format!("loss report field {key} is not a number"))
}

fn string(text: &str, key: &str) -> Result<String, String> {
    let pattern = format!("\"{key}\":\"");
    let at = text
        .find(&pattern)
        .ok_or_else(|| format!("loss report lacks {key}"))?;
    let rest = &text[at + pattern.len()..];
    let end = rest.find('"').ok_or("unterminated string in loss report")?;
    Ok(rest[..end].to_string())
}

impl LossSummary {
    pub fn parse(json: &str) -> Result<LossSummary, String> {
        let lost_at = json.find("\"lost\":[").ok_or("loss report lacks lost")?;
        let (head, lost) = json.split_at(lost_at);
        let mut entries = Vec::new();
        for object in lost.split('{').skip(1) {
            entries.push(LostEntry {
                seq: number(object, "seq")?,
                volume_offset: number(object, "volume_offset")?,
                len: number(object, "len")?,
                reason: string(object, "reason")?,
            });
        }
        let summary = LossSummary {
            old_epoch: number(head, "old_epoch")?,
            new_epoch: number(head, "new_epoch")?,
            aux_table_read: head.contains("\"aux_table_read\":true"),
            applied_before: number(head, "applied_before")?,
            cut: number(head, "cut")?,
            applied_from_ring: number(head, "applied_from_ring")?,
            applied_landed: number(head, "applied_landed")?,
            held_through: number(head, "held_through")?,
            lost: entries,
        };
        if number(head, "lost_count")? != summary.lost.len() as u64 {
            return Err("loss report's lost_count disagrees with its list".into());
        }
        Ok(summary)
    }

    pub fn human(&self) -> String {
        let mut text = format!(
            "failover: epoch {} -> {}; the DR volume holds ops 1..={} in order ({} applied before failover, {} applied from the staging ring during failover, {} of them known to have landed only through the aux table{}); {} op(s) lost",
            self.old_epoch,
            self.new_epoch,
            self.cut,
            self.applied_before,
            self.applied_landed + self.applied_from_ring,
            self.applied_from_ring,
            if self.aux_table_read { "" } else { "; the aux table was NOT read, the list may be incomplete" },
            self.lost.len()
        );
        for entry in self.lost.iter().take(20) {
            text.push_str(&format!(
                "\n  lost op {} at byte {} ({} bytes): {}",
                entry.seq, entry.volume_offset, entry.len, entry.reason
            ));
        }
        if self.lost.len() > 20 {
            text.push_str(&format!(
                "\n  ... and {} more (see the JSON)",
                self.lost.len() - 20
            ));
        }
        text
    }
}

impl LossSummary {
    /// The report as the protocol's type, for the invariant checker.
    pub fn to_report(&self) -> Result<ordinal_proto::dr::LossReport, String> {
        use ordinal_proto::dr::{LossReason, LossReport, LostWrite};
        let epoch = |value: u64, what: &str| {
            u32::try_from(value).map_err(|_| format!("loss report: {what} {value} is not an epoch"))
        };
        let mut lost = Vec::with_capacity(self.lost.len());
        for entry in &self.lost {
            lost.push(LostWrite {
                seq: entry.seq,
                volume_offset: entry.volume_offset,
                len: u32::try_from(entry.len).map_err(|_| {
                    format!("loss report: op {} has length {}", entry.seq, entry.len)
                })?,
                reason: LossReason::from_name(&entry.reason).ok_or_else(|| {
                    format!(
                        "loss report: op {} has unknown reason {:?}",
                        entry.seq, entry.reason
                    )
                })?,
            });
        }
        Ok(LossReport {
            old_epoch: epoch(self.old_epoch, "old_epoch")?,
            new_epoch: epoch(self.new_epoch, "new_epoch")?,
            aux_table_read: self.aux_table_read,
            applied_before: self.applied_before,
            cut: self.cut,
            applied_from_ring: self.applied_from_ring,
            applied_landed: self.applied_landed,
            held_through: self.held_through,
            lost,
        })
    }
}
