//! The CQL text of the store: the schema, filled in from the templates in
//! `schemas/cql/` (the one source of truth, compiled in), and every statement
//! the store prepares. Pure text, no I/O, so it is tested everywhere.
//!
//! Names are spliced in unquoted; [`Names::new`] only accepts ones that CQL
//! reads back unchanged (`[a-z0-9_]`).

use super::uri::{is_plain_name, Replication};

const KEYSPACE_CQL: &str = include_str!("../../../../schemas/cql/keyspace.cql");
const TABLES_CQL: &str = include_str!("../../../../schemas/cql/tables.cql");
const VERSIONS_CQL: &str = include_str!("../../../../schemas/cql/versions.cql");

/// The bookkeeping table of the projection versions of a keyspace.
pub const VERSIONS_TABLE: &str = "projection_versions";
/// Its one partition key value.
pub const BOOK: &str = "chat";
/// The name of the pointer's row (no version can be called that).
pub const POINTER_ROW: &str = "@current";

/// The tables of one projection version (namespace) in one keyspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub keyspace: String,
    pub namespace: String,
}

impl Names {
    /// `namespace` is the projection version: 1 to 32 of `[a-z0-9_]`, so
    /// the longest table name (`message_changes_` + namespace) stays within
    /// Scylla's 48 characters.
    pub fn new(keyspace: &str, namespace: &str) -> Result<Self, String> {
        if !is_plain_name(keyspace, 48, true) {
            return Err(format!(
                "bad keyspace {keyspace:?}: 1 to 48 of [a-z0-9_], starting with a letter"
            ));
        }
        if !is_plain_name(namespace, 32, false) {
            return Err(format!("bad namespace {namespace:?}: 1 to 32 of [a-z0-9_]"));
        }
        Ok(Names {
            keyspace: keyspace.to_owned(),
            namespace: namespace.to_owned(),
        })
    }

    fn table(&self, base: &str) -> String {
        format!("{}.{base}_{}", self.keyspace, self.namespace)
    }

    pub fn messages(&self) -> String {
        self.table("messages")
    }

    pub fn room_buckets(&self) -> String {
        self.table("room_buckets")
    }

    pub fn message_ids(&self) -> String {
        self.table("message_ids")
    }

    pub fn positions(&self) -> String {
        self.table("positions")
    }

    pub fn room_reads(&self) -> String {
        self.table("room_reads")
    }

    pub fn user_rooms(&self) -> String {
        self.table("user_rooms")
    }

    pub fn message_changes(&self) -> String {
        self.table("message_changes")
    }

    pub fn room_changes(&self) -> String {
        self.table("room_changes")
    }

    /// Every table of the version, as [`table_statements`] creates them.
    pub fn tables(&self) -> [String; 8] {
        [
            self.messages(),
            self.room_buckets(),
            self.message_ids(),
            self.positions(),
            self.room_reads(),
            self.user_rooms(),
            self.message_changes(),
            self.room_changes(),
        ]
    }
}

/// The statements of a CQL script: `--` comments dropped, split on `;`.
fn statements(script: &str) -> Vec<String> {
    let stripped: String = script
        .lines()
        .map(|line| line.split_once("--").map_or(line, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    stripped
        .split(';')
        .map(|s| {
            s.lines()
                .map(str::trim_end)
                .filter(|l| !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// `CREATE KEYSPACE IF NOT EXISTS`, with the URI's replication.
pub fn keyspace_statement(keyspace: &str, replication: &Replication) -> String {
    let script = KEYSPACE_CQL
        .replace("${keyspace}", keyspace)
        .replace("${replication}", &replication.cql());
    statements(&script).concat()
}

/// `CREATE TABLE IF NOT EXISTS` for every table of the version.
pub fn table_statements(names: &Names) -> Vec<String> {
    let script = TABLES_CQL
        .replace("${keyspace}", &names.keyspace)
        .replace("${ns}", &names.namespace);
    statements(&script)
}

/// `DROP TABLE IF EXISTS` for every table of the version.
pub fn drop_statements(names: &Names) -> Vec<String> {
    names
        .tables()
        .iter()
        .map(|table| format!("DROP TABLE IF EXISTS {table}"))
        .collect()
}

/// `CREATE TABLE IF NOT EXISTS` for the versions table of `keyspace`.
pub fn versions_statement(keyspace: &str) -> String {
    statements(&VERSIONS_CQL.replace("${keyspace}", keyspace)).concat()
}

/// The statements on the versions table. The partition key (`book`) is
/// bound like every other one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionStatements {
    /// (book) -> (name, state, created_ms, replay_from, points_to), every row
    pub select_book: String,
    /// (book, name) -> (name, state, created_ms, replay_from, points_to)
    pub select_row: String,
    /// (book, name, state, created_ms, replay_from)
    pub upsert_version: String,
    /// (book, name = POINTER_ROW, points_to)
    pub upsert_pointer: String,
    /// (book, name)
    pub delete_row: String,
}

impl VersionStatements {
    pub fn new(keyspace: &str) -> Self {
        let table = format!("{keyspace}.{VERSIONS_TABLE}");
        let columns = "name, state, created_ms, replay_from, points_to";
        VersionStatements {
            select_book: format!("SELECT {columns} FROM {table} WHERE book = ?"),
            select_row: format!("SELECT {columns} FROM {table} WHERE book = ? AND name = ?"),
            upsert_version: format!(
                "INSERT INTO {table} (book, name, state, created_ms, replay_from) \
                 VALUES (?, ?, ?, ?, ?)"
            ),
            upsert_pointer: format!("INSERT INTO {table} (book, name, points_to) VALUES (?, ?, ?)"),
            delete_row: format!("DELETE FROM {table} WHERE book = ? AND name = ?"),
        }
    }
}

/// Every statement the store prepares. Partition key values are always bound
/// (never literals), which is what lets the driver route each request to a
/// replica, and the right shard of it, owning the partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statements {
    /// (room, bucket, log_offset, msg_id, author, body, ts)
    pub insert_message: String,
    /// (room, bucket, log_partition)
    pub insert_bucket: String,
    /// (room, msg_id, log_offset, ts, log_partition)
    pub insert_claim: String,
    /// (room, msg_id) -> (log_offset, ts, log_partition)
    pub select_claim: String,
    /// (log_partition, next_offset, write timestamp = next_offset)
    pub insert_position: String,
    /// (log_partition) -> (next_offset)
    pub select_position: String,
    /// (room, at_most, limit) -> (bucket, log_partition), newest first
    pub select_buckets: String,
    /// (room, bucket, before, limit) -> (log_offset, msg_id, author, body, ts), newest first
    pub select_rows: String,
    /// () -> (next_offset) of every log partition: a scan of the (small)
    /// positions table, for the records a version covers
    pub select_positions: String,
    /// (room, reader, read_offset, timestamp = read_offset)
    pub insert_read: String,
    /// (room, reader) -> (read_offset)
    pub select_read: String,
    /// (room, limit) -> (reader, read_offset), by reader
    pub select_reads: String,
    /// (member, room)
    pub insert_member: String,
    /// (member, limit) -> (room), by room
    pub select_member_rooms: String,
    /// (room, bucket, log_offset): the body of a message deleted by its author
    pub erase_body: String,
    /// (room, bucket, target_offset, change_offset, msg_id, author, kind, text, ts)
    pub insert_change: String,
    /// (room, bucket, first, last) -> (target_offset, change_offset, msg_id,
    /// author, kind, text, ts), by target then change; paged
    pub select_changes: String,
    /// (room, bucket, target_offset, change_offset): the body of an edit of a
    /// deleted message
    pub erase_edit: String,
    /// (room, bucket, change_offset, target_offset, msg_id, author, kind, text, ts)
    pub insert_room_change: String,
    /// (room, bucket, from, upto) -> (change_offset, target_offset, msg_id,
    /// author, kind, text, ts), by change; paged
    pub select_room_changes: String,
    /// (room, bucket, change_offset): the body of an edit of a deleted
    /// message, in `room_changes`
    pub erase_room_edit: String,
}

impl Statements {
    pub fn new(names: &Names) -> Self {
        let (messages, buckets, ids, positions) = (
            names.messages(),
            names.room_buckets(),
            names.message_ids(),
            names.positions(),
        );
        let (reads, members, changes, logged) = (
            names.room_reads(),
            names.user_rooms(),
            names.message_changes(),
            names.room_changes(),
        );
        Statements {
            insert_message: format!(
                "INSERT INTO {messages} (room, bucket, log_offset, msg_id, author, body, ts) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)"
            ),
            insert_bucket: format!(
                "INSERT INTO {buckets} (room, bucket, log_partition) VALUES (?, ?, ?)"
            ),
            insert_claim: format!(
                "INSERT INTO {ids} (room, msg_id, log_offset, ts, log_partition) \
                 VALUES (?, ?, ?, ?, ?)"
            ),
            select_claim: format!(
                "SELECT log_offset, ts, log_partition FROM {ids} WHERE room = ? AND msg_id = ?"
            ),
            insert_position: format!(
                "INSERT INTO {positions} (log_partition, next_offset) VALUES (?, ?) \
                 USING TIMESTAMP ?"
            ),
            select_position: format!("SELECT next_offset FROM {positions} WHERE log_partition = ?"),
            select_buckets: format!(
                "SELECT bucket, log_partition FROM {buckets} \
                 WHERE room = ? AND bucket <= ? LIMIT ?"
            ),
            select_rows: format!(
                "SELECT log_offset, msg_id, author, body, ts FROM {messages} \
                 WHERE room = ? AND bucket = ? AND log_offset < ? LIMIT ?"
            ),
            select_positions: format!("SELECT next_offset FROM {positions}"),
            insert_read: format!(
                "INSERT INTO {reads} (room, reader, read_offset) VALUES (?, ?, ?) \
                 USING TIMESTAMP ?"
            ),
            select_read: format!("SELECT read_offset FROM {reads} WHERE room = ? AND reader = ?"),
            select_reads: format!("SELECT reader, read_offset FROM {reads} WHERE room = ? LIMIT ?"),
            insert_member: format!("INSERT INTO {members} (member, room) VALUES (?, ?)"),
            select_member_rooms: format!("SELECT room FROM {members} WHERE member = ? LIMIT ?"),
            erase_body: format!(
                "DELETE body FROM {messages} WHERE room = ? AND bucket = ? AND log_offset = ?"
            ),
            insert_change: format!(
                "INSERT INTO {changes} \
                 (room, bucket, target_offset, change_offset, msg_id, author, kind, text, ts) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            select_changes: format!(
                "SELECT target_offset, change_offset, msg_id, author, kind, text, ts \
                 FROM {changes} \
                 WHERE room = ? AND bucket = ? AND target_offset >= ? AND target_offset <= ?"
            ),
            erase_edit: format!(
                "DELETE text FROM {changes} \
                 WHERE room = ? AND bucket = ? AND target_offset = ? AND change_offset = ?"
            ),
            // The same columns in the same order as `message_changes`, so
            // one piece of code binds and reads both.
            insert_room_change: format!(
                "INSERT INTO {logged} \
                 (room, bucket, target_offset, change_offset, msg_id, author, kind, text, ts) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            select_room_changes: format!(
                "SELECT target_offset, change_offset, msg_id, author, kind, text, ts \
                 FROM {logged} \
                 WHERE room = ? AND bucket = ? AND change_offset >= ? AND change_offset < ?"
            ),
            erase_room_edit: format!(
                "DELETE text FROM {logged} WHERE room = ? AND bucket = ? AND change_offset = ?"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::uri::Strategy;
    use super::*;

    fn names() -> Names {
        Names::new("chat", "v1").unwrap()
    }

    #[test]
    fn keyspace_statement_carries_the_replication() {
        let cql = keyspace_statement(
            "chat",
            &Replication {
                strategy: Strategy::Simple,
                factor: 1,
            },
        );
        assert_eq!(
            cql,
            "CREATE KEYSPACE IF NOT EXISTS chat\n  \
             WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}\n  \
             AND durable_writes = true"
        );
    }

    #[test]
    fn table_statements_create_the_eight_tables_of_the_version() {
        let stmts = table_statements(&names());
        assert_eq!(stmts.len(), 8, "{stmts:#?}");
        for (stmt, table) in stmts.iter().zip([
            "chat.messages_v1",
            "chat.room_buckets_v1",
            "chat.message_ids_v1",
            "chat.positions_v1",
            "chat.room_reads_v1",
            "chat.user_rooms_v1",
            "chat.message_changes_v1",
            "chat.room_changes_v1",
        ]) {
            assert!(
                stmt.starts_with(&format!("CREATE TABLE IF NOT EXISTS {table} (")),
                "{stmt}"
            );
            assert!(!stmt.contains("${"), "{stmt}");
            assert!(!stmt.contains("--"), "{stmt}");
        }
        assert!(stmts[0].contains("PRIMARY KEY ((room, bucket), log_offset)"));
        assert!(stmts[0].ends_with("WITH CLUSTERING ORDER BY (log_offset DESC)"));
        assert!(stmts[1].contains("PRIMARY KEY ((room), bucket)"));
        assert!(stmts[1].contains("log_partition int STATIC"));
        assert!(stmts[1].ends_with("WITH CLUSTERING ORDER BY (bucket DESC)"));
        assert!(stmts[2].contains("PRIMARY KEY ((room, msg_id))"));
        assert!(stmts[3].contains("PRIMARY KEY (log_partition)"));
        assert!(stmts[6].contains("PRIMARY KEY ((room, bucket), target_offset, change_offset)"));
        assert!(
            stmts[6].ends_with("WITH CLUSTERING ORDER BY (target_offset ASC, change_offset ASC)")
        );
        assert!(stmts[7].contains("PRIMARY KEY ((room, bucket), change_offset)"));
        assert!(stmts[7].ends_with("WITH CLUSTERING ORDER BY (change_offset ASC)"));
    }

    #[test]
    fn statements_name_the_versioned_tables() {
        let s = Statements::new(&Names::new("chat_test", "t42").unwrap());
        assert_eq!(
            s.insert_message,
            "INSERT INTO chat_test.messages_t42 (room, bucket, log_offset, msg_id, author, body, ts) \
             VALUES (?, ?, ?, ?, ?, ?, ?)"
        );
        assert_eq!(
            s.insert_position,
            "INSERT INTO chat_test.positions_t42 (log_partition, next_offset) VALUES (?, ?) \
             USING TIMESTAMP ?"
        );
        assert_eq!(
            s.select_rows,
            "SELECT log_offset, msg_id, author, body, ts FROM chat_test.messages_t42 \
             WHERE room = ? AND bucket = ? AND log_offset < ? LIMIT ?"
        );
        assert_eq!(
            s.select_buckets,
            "SELECT bucket, log_partition FROM chat_test.room_buckets_t42 \
             WHERE room = ? AND bucket <= ? LIMIT ?"
        );
        assert_eq!(
            s.select_claim,
            "SELECT log_offset, ts, log_partition FROM chat_test.message_ids_t42 \
             WHERE room = ? AND msg_id = ?"
        );
        assert_eq!(
            s.select_changes,
            "SELECT target_offset, change_offset, msg_id, author, kind, text, ts \
             FROM chat_test.message_changes_t42 \
             WHERE room = ? AND bucket = ? AND target_offset >= ? AND target_offset <= ?"
        );
        assert_eq!(
            s.erase_body,
            "DELETE body FROM chat_test.messages_t42 \
             WHERE room = ? AND bucket = ? AND log_offset = ?"
        );
        assert_eq!(
            s.select_room_changes,
            "SELECT target_offset, change_offset, msg_id, author, kind, text, ts \
             FROM chat_test.room_changes_t42 \
             WHERE room = ? AND bucket = ? AND change_offset >= ? AND change_offset < ?"
        );
        assert_eq!(
            s.erase_room_edit,
            "DELETE text FROM chat_test.room_changes_t42 \
             WHERE room = ? AND bucket = ? AND change_offset = ?"
        );
        // Every statement binds its values: no literal partition keys.
        for text in [
            &s.insert_message,
            &s.insert_bucket,
            &s.insert_claim,
            &s.select_claim,
            &s.insert_position,
            &s.select_position,
            &s.select_buckets,
            &s.select_rows,
            &s.select_positions,
            &s.erase_body,
            &s.insert_change,
            &s.select_changes,
            &s.erase_edit,
            &s.insert_room_change,
            &s.select_room_changes,
            &s.erase_room_edit,
        ] {
            assert!(!text.contains('\''), "{text}");
            assert!(
                text.contains("chat_test.") && text.contains("_t42"),
                "{text}"
            );
        }
    }

    #[test]
    fn the_versions_table_is_one_partition_of_the_keyspace() {
        let cql = versions_statement("chat");
        assert!(
            cql.starts_with("CREATE TABLE IF NOT EXISTS chat.projection_versions ("),
            "{cql}"
        );
        assert!(cql.contains("PRIMARY KEY ((book), name)"), "{cql}");
        assert!(!cql.contains("${") && !cql.contains("--"), "{cql}");
        for column in [
            "state text",
            "created_ms bigint",
            "replay_from text",
            "points_to text",
        ] {
            assert!(cql.contains(column), "{column}: {cql}");
        }
        let s = VersionStatements::new("chat_test");
        assert_eq!(
            s.upsert_pointer,
            "INSERT INTO chat_test.projection_versions (book, name, points_to) VALUES (?, ?, ?)"
        );
        assert_eq!(
            s.select_book,
            "SELECT name, state, created_ms, replay_from, points_to \
             FROM chat_test.projection_versions WHERE book = ?"
        );
        for text in [
            &s.select_book,
            &s.select_row,
            &s.upsert_version,
            &s.upsert_pointer,
            &s.delete_row,
        ] {
            assert!(
                text.contains("book = ?") || text.contains("(book,"),
                "{text}"
            );
            assert!(!text.contains('\''), "{text}");
        }
        // The pointer's row can never be a version's.
        assert!(crate::versions::check_name(POINTER_ROW).is_err());
        assert!(Names::new("chat", POINTER_ROW).is_err());
    }

    #[test]
    fn dropping_a_version_drops_its_eight_tables_only() {
        let drops = drop_statements(&Names::new("chat", "v2").unwrap());
        assert_eq!(
            drops,
            [
                "DROP TABLE IF EXISTS chat.messages_v2",
                "DROP TABLE IF EXISTS chat.room_buckets_v2",
                "DROP TABLE IF EXISTS chat.message_ids_v2",
                "DROP TABLE IF EXISTS chat.positions_v2",
                "DROP TABLE IF EXISTS chat.room_reads_v2",
                "DROP TABLE IF EXISTS chat.user_rooms_v2",
                "DROP TABLE IF EXISTS chat.message_changes_v2",
                "DROP TABLE IF EXISTS chat.room_changes_v2",
            ]
        );
        // The same tables the version's schema creates.
        let creates = table_statements(&Names::new("chat", "v2").unwrap());
        assert_eq!(creates.len(), drops.len());
        for (create, drop) in creates.iter().zip(&drops) {
            let table = drop.strip_prefix("DROP TABLE IF EXISTS ").unwrap();
            assert!(
                create.starts_with(&format!("CREATE TABLE IF NOT EXISTS {table} (")),
                "{create}"
            );
        }
    }

    #[test]
    fn names_refuse_what_cql_would_change() {
        assert!(Names::new("chat", "v1").is_ok());
        assert!(Names::new("chat", "2024_rebuild").is_ok());
        assert!(Names::new("chat", &"n".repeat(32)).is_ok());
        for ns in ["", "V1", "v-2", "v 1", "v1;", &"n".repeat(33)] {
            assert!(Names::new("chat", ns).is_err(), "{ns:?}");
        }
        assert!(Names::new("Chat", "v1").is_err());
        for table in Names::new("chat", &"n".repeat(32)).unwrap().tables() {
            let table = table.split_once('.').unwrap().1;
            assert!(table.len() <= 48, "{table}");
        }
    }
}
