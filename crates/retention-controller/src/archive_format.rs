//! The archive's file format: Parquet (zstd), one row per task (a run) with its events, payloads
//! and log lines nested as lists, so that any Parquet reader gets a run whole:
//!
//! ```sql
//! -- DuckDB
//! SELECT task_id, status, finished_at, len(events) FROM 'archive/*/*/*.parquet' WHERE status = 'failed';
//! SELECT t.task_id, e.event_type FROM 'archive/**/*.parquet' t, unnest(t.events) AS u(e);
//! ```
//!
//! Schema version [`SCHEMA_VERSION`] (also in each file's key-value metadata under
//! `retention.archive.schema_version`); docs/operations.md, "Reading an archive", lists its
//! columns. A file's bytes are a function of its rows alone (no timestamps of writing, fixed
//! writer settings), so a file written again after a crash is the same file.

use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, Int64Builder, ListBuilder, StringBuilder, StructBuilder,
    TimestampMicrosecondBuilder,
};
use arrow_array::{
    Array, ArrayRef, Int32Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};
use chrono::{DateTime, Utc};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use uuid::Uuid;

/// The version of the columns below. A reader checks it; a change of columns raises it.
pub const SCHEMA_VERSION: i32 = 1;
/// The key-value metadata key holding [`SCHEMA_VERSION`].
pub const SCHEMA_VERSION_KEY: &str = "retention.archive.schema_version";

/// A task as archived, with everything that leaves with it.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedTask {
    pub tenant_id: Uuid,
    pub task_id: Uuid,
    pub status: String,
    pub inserted_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// `tasks.payload` (jsonb) as JSON text.
    pub payload: Option<String>,
    pub events: Vec<ArchivedEvent>,
    pub payloads: Vec<ArchivedPayload>,
    pub logs: Vec<ArchivedLog>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedEvent {
    pub id: i64,
    pub event_type: String,
    pub created_at: DateTime<Utc>,
    /// `task_events.data` (jsonb) as JSON text.
    pub data: Option<String>,
}

/// A payload row: its content when stored inline, else the key of its object (which leaves the
/// store with the row: the archive keeps the key, not the object).
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedPayload {
    pub id: i64,
    pub kind: String,
    pub location: String,
    pub inline_content: Option<Vec<u8>>,
    pub external_key: Option<String>,
    pub size_bytes: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedLog {
    pub id: i64,
    pub created_at: DateTime<Utc>,
    pub level: String,
    pub line: String,
}

fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn event_fields() -> Fields {
    Fields::from(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("event_type", DataType::Utf8, false),
        Field::new("created_at", timestamp(), false),
        Field::new("data", DataType::Utf8, true),
    ])
}

fn payload_fields() -> Fields {
    Fields::from(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("location", DataType::Utf8, false),
        Field::new("inline_content", DataType::Binary, true),
        Field::new("external_key", DataType::Utf8, true),
        Field::new("size_bytes", DataType::Int64, false),
        Field::new("created_at", timestamp(), false),
    ])
}

fn log_fields() -> Fields {
    Fields::from(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("created_at", timestamp(), false),
        Field::new("level", DataType::Utf8, false),
        Field::new("line", DataType::Utf8, false),
    ])
}

fn list_of(fields: Fields) -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Struct(fields), true)))
}

/// The columns of schema version 1.
pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("schema_version", DataType::Int32, false),
        Field::new("tenant_id", DataType::Utf8, false),
        Field::new("task_id", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("inserted_at", timestamp(), false),
        Field::new("finished_at", timestamp(), true),
        Field::new("payload", DataType::Utf8, true),
        Field::new("events", list_of(event_fields()), false),
        Field::new("payloads", list_of(payload_fields()), false),
        Field::new("logs", list_of(log_fields()), false),
    ]))
}

/// The writer's settings: fixed, so the same rows make the same bytes.
fn properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("a valid level"),
        ))
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_created_by(format!("engine retention archive {SCHEMA_VERSION}"))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            SCHEMA_VERSION_KEY.to_string(),
            SCHEMA_VERSION.to_string(),
        )]))
        .build()
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

/// `tasks` as one batch of the schema.
pub fn batch(tasks: &[ArchivedTask]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = tasks.len();
    let mut events = ListBuilder::new(StructBuilder::from_fields(event_fields(), 0)).with_field(
        Arc::new(Field::new("item", DataType::Struct(event_fields()), true)),
    );
    let mut payloads =
        ListBuilder::new(StructBuilder::from_fields(payload_fields(), 0)).with_field(Arc::new(
            Field::new("item", DataType::Struct(payload_fields()), true),
        ));
    let mut logs = ListBuilder::new(StructBuilder::from_fields(log_fields(), 0)).with_field(
        Arc::new(Field::new("item", DataType::Struct(log_fields()), true)),
    );
    for task in tasks {
        let values = events.values();
        for event in &task.events {
            field::<Int64Builder>(values, 0).append_value(event.id);
            field::<StringBuilder>(values, 1).append_value(&event.event_type);
            field::<TimestampMicrosecondBuilder>(values, 2).append_value(micros(event.created_at));
            field::<StringBuilder>(values, 3).append_option(event.data.as_deref());
            values.append(true);
        }
        events.append(true);
        let values = payloads.values();
        for payload in &task.payloads {
            field::<Int64Builder>(values, 0).append_value(payload.id);
            field::<StringBuilder>(values, 1).append_value(&payload.kind);
            field::<StringBuilder>(values, 2).append_value(&payload.location);
            field::<BinaryBuilder>(values, 3).append_option(payload.inline_content.as_deref());
            field::<StringBuilder>(values, 4).append_option(payload.external_key.as_deref());
            field::<Int64Builder>(values, 5).append_value(payload.size_bytes);
            field::<TimestampMicrosecondBuilder>(values, 6)
                .append_value(micros(payload.created_at));
            values.append(true);
        }
        payloads.append(true);
        let values = logs.values();
        for log in &task.logs {
            field::<Int64Builder>(values, 0).append_value(log.id);
            field::<TimestampMicrosecondBuilder>(values, 1).append_value(micros(log.created_at));
            field::<StringBuilder>(values, 2).append_value(&log.level);
            field::<StringBuilder>(values, 3).append_value(&log.line);
            values.append(true);
        }
        logs.append(true);
    }
    let utc = |values: Vec<Option<i64>>| {
        Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC")) as ArrayRef
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int32Array::from(vec![SCHEMA_VERSION; n])),
        Arc::new(StringArray::from_iter_values(
            tasks.iter().map(|t| t.tenant_id.to_string()),
        )),
        Arc::new(StringArray::from_iter_values(
            tasks.iter().map(|t| t.task_id.to_string()),
        )),
        Arc::new(StringArray::from_iter_values(
            tasks.iter().map(|t| t.status.as_str()),
        )),
        utc(tasks.iter().map(|t| Some(micros(t.inserted_at))).collect()),
        utc(tasks.iter().map(|t| t.finished_at.map(micros)).collect()),
        Arc::new(StringArray::from(
            tasks
                .iter()
                .map(|t| t.payload.as_deref())
                .collect::<Vec<_>>(),
        )),
        Arc::new(events.finish()),
        Arc::new(payloads.finish()),
        Arc::new(logs.finish()),
    ];
    RecordBatch::try_new(schema(), columns)
}

fn field<T: arrow_array::builder::ArrayBuilder>(values: &mut StructBuilder, i: usize) -> &mut T {
    values
        .field_builder::<T>(i)
        .expect("the builder of the schema's field")
}

/// An archive file being written: rows go in batch by batch; [`FileWriter::finish`] gives its
/// bytes. The caller starts a new file once [`FileWriter::bytes_so_far`] passes its bound.
pub struct FileWriter {
    writer: ArrowWriter<Vec<u8>>,
    tasks: u64,
}

impl FileWriter {
    pub fn new() -> Result<FileWriter, parquet::errors::ParquetError> {
        Ok(FileWriter {
            writer: ArrowWriter::try_new(Vec::new(), schema(), Some(properties()))?,
            tasks: 0,
        })
    }

    /// Writes `tasks` as one row group.
    pub fn write(&mut self, tasks: &[ArchivedTask]) -> Result<(), parquet::errors::ParquetError> {
        if tasks.is_empty() {
            return Ok(());
        }
        self.writer.write(&batch(tasks)?)?;
        self.writer.flush()?;
        self.tasks += tasks.len() as u64;
        Ok(())
    }

    /// Tasks written so far.
    pub fn tasks(&self) -> u64 {
        self.tasks
    }

    /// Bytes of the row groups flushed so far (the footer adds a little).
    pub fn bytes_so_far(&self) -> usize {
        self.writer.bytes_written()
    }

    /// The whole file.
    pub fn finish(self) -> Result<Vec<u8>, parquet::errors::ParquetError> {
        self.writer.into_inner()
    }
}

/// Why a file could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error(transparent)]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("schema version {found:?} in the file's metadata; this engine reads version {SCHEMA_VERSION}")]
    Version { found: Option<String> },
    #[error("column {0}: {1}")]
    Column(&'static str, String),
}

/// Reads a whole archive file back (of [`SCHEMA_VERSION`]): its runs in file order.
pub fn read(bytes: bytes::Bytes) -> Result<Vec<ArchivedTask>, ReadError> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let version = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|e| e.key == SCHEMA_VERSION_KEY))
        .and_then(|e| e.value.clone());
    if version.as_deref() != Some(&SCHEMA_VERSION.to_string()) {
        return Err(ReadError::Version { found: version });
    }
    let mut tasks = Vec::new();
    for batch in builder.build()? {
        read_batch(&batch?, &mut tasks)?;
    }
    Ok(tasks)
}

fn column<'a>(batch: &'a RecordBatch, name: &'static str) -> Result<&'a ArrayRef, ReadError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| ReadError::Column(name, "missing".into()))
}

fn struct_column<'a>(
    array: &'a arrow_array::StructArray,
    name: &'static str,
) -> Result<&'a ArrayRef, ReadError> {
    array
        .column_by_name(name)
        .ok_or_else(|| ReadError::Column(name, "missing".into()))
}

fn strings<'a>(array: &'a ArrayRef, name: &'static str) -> Result<&'a StringArray, ReadError> {
    array
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| ReadError::Column(name, "not strings".into()))
}

fn times<'a>(
    array: &'a ArrayRef,
    name: &'static str,
) -> Result<&'a TimestampMicrosecondArray, ReadError> {
    array
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .ok_or_else(|| ReadError::Column(name, "not timestamps (µs)".into()))
}

fn int64s<'a>(
    array: &'a ArrayRef,
    name: &'static str,
) -> Result<&'a arrow_array::Int64Array, ReadError> {
    array
        .as_any()
        .downcast_ref::<arrow_array::Int64Array>()
        .ok_or_else(|| ReadError::Column(name, "not int64".into()))
}

fn instant(
    array: &TimestampMicrosecondArray,
    i: usize,
    name: &'static str,
) -> Result<DateTime<Utc>, ReadError> {
    DateTime::from_timestamp_micros(array.value(i))
        .ok_or_else(|| ReadError::Column(name, format!("{} is out of range", array.value(i))))
}

fn optional_instant(
    array: &TimestampMicrosecondArray,
    i: usize,
    name: &'static str,
) -> Result<Option<DateTime<Utc>>, ReadError> {
    if array.is_null(i) {
        Ok(None)
    } else {
        instant(array, i, name).map(Some)
    }
}

fn optional_string(array: &StringArray, i: usize) -> Option<String> {
    (!array.is_null(i)).then(|| array.value(i).to_string())
}

fn uuid_at(array: &StringArray, i: usize, name: &'static str) -> Result<Uuid, ReadError> {
    array
        .value(i)
        .parse()
        .map_err(|e| ReadError::Column(name, format!("{:?} is not a UUID ({e})", array.value(i))))
}

/// The structs of row `i` of list column `name`.
fn items(
    batch: &RecordBatch,
    name: &'static str,
    i: usize,
) -> Result<arrow_array::StructArray, ReadError> {
    let list = column(batch, name)?
        .as_any()
        .downcast_ref::<arrow_array::ListArray>()
        .ok_or_else(|| ReadError::Column(name, "not a list".into()))?;
    let value = list.value(i);
    value
        .as_any()
        .downcast_ref::<arrow_array::StructArray>()
        .cloned()
        .ok_or_else(|| ReadError::Column(name, "not a list of structs".into()))
}

fn read_batch(batch: &RecordBatch, into: &mut Vec<ArchivedTask>) -> Result<(), ReadError> {
    let tenant = strings(column(batch, "tenant_id")?, "tenant_id")?;
    let task = strings(column(batch, "task_id")?, "task_id")?;
    let status = strings(column(batch, "status")?, "status")?;
    let inserted = times(column(batch, "inserted_at")?, "inserted_at")?;
    let finished = times(column(batch, "finished_at")?, "finished_at")?;
    let payload = strings(column(batch, "payload")?, "payload")?;
    for i in 0..batch.num_rows() {
        let mut row = ArchivedTask {
            tenant_id: uuid_at(tenant, i, "tenant_id")?,
            task_id: uuid_at(task, i, "task_id")?,
            status: status.value(i).to_string(),
            inserted_at: instant(inserted, i, "inserted_at")?,
            finished_at: optional_instant(finished, i, "finished_at")?,
            payload: optional_string(payload, i),
            events: Vec::new(),
            payloads: Vec::new(),
            logs: Vec::new(),
        };
        let events = items(batch, "events", i)?;
        let (id, kind, created, data) = (
            int64s(struct_column(&events, "id")?, "events.id")?,
            strings(struct_column(&events, "event_type")?, "events.event_type")?,
            times(struct_column(&events, "created_at")?, "events.created_at")?,
            strings(struct_column(&events, "data")?, "events.data")?,
        );
        for j in 0..events.len() {
            row.events.push(ArchivedEvent {
                id: id.value(j),
                event_type: kind.value(j).to_string(),
                created_at: instant(created, j, "events.created_at")?,
                data: optional_string(data, j),
            });
        }
        let payloads = items(batch, "payloads", i)?;
        let inline = struct_column(&payloads, "inline_content")?
            .as_any()
            .downcast_ref::<arrow_array::BinaryArray>()
            .ok_or_else(|| ReadError::Column("payloads.inline_content", "not binary".into()))?;
        let (id, kind, location, key, size, created) = (
            int64s(struct_column(&payloads, "id")?, "payloads.id")?,
            strings(struct_column(&payloads, "kind")?, "payloads.kind")?,
            strings(struct_column(&payloads, "location")?, "payloads.location")?,
            strings(
                struct_column(&payloads, "external_key")?,
                "payloads.external_key",
            )?,
            int64s(
                struct_column(&payloads, "size_bytes")?,
                "payloads.size_bytes",
            )?,
            times(
                struct_column(&payloads, "created_at")?,
                "payloads.created_at",
            )?,
        );
        for j in 0..payloads.len() {
            row.payloads.push(ArchivedPayload {
                id: id.value(j),
                kind: kind.value(j).to_string(),
                location: location.value(j).to_string(),
                inline_content: (!inline.is_null(j)).then(|| inline.value(j).to_vec()),
                external_key: optional_string(key, j),
                size_bytes: size.value(j),
                created_at: instant(created, j, "payloads.created_at")?,
            });
        }
        let logs = items(batch, "logs", i)?;
        let (id, created, level, line) = (
            int64s(struct_column(&logs, "id")?, "logs.id")?,
            times(struct_column(&logs, "created_at")?, "logs.created_at")?,
            strings(struct_column(&logs, "level")?, "logs.level")?,
            strings(struct_column(&logs, "line")?, "logs.line")?,
        );
        for j in 0..logs.len() {
            row.logs.push(ArchivedLog {
                id: id.value(j),
                created_at: instant(created, j, "logs.created_at")?,
                level: level.value(j).to_string(),
                line: line.value(j).to_string(),
            });
        }
        into.push(row);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_reads_back_as_written_in_two_row_groups() {
        let rows = sample();
        let mut writer = FileWriter::new().unwrap();
        writer.write(&rows[..1]).unwrap();
        writer.write(&rows[1..]).unwrap();
        let bytes = writer.finish().unwrap();
        assert_eq!(read(bytes::Bytes::from(bytes)).unwrap(), rows);
    }

    #[test]
    fn a_file_of_another_schema_version_is_refused() {
        let batch = batch(&sample()).unwrap();
        let mut writer = ArrowWriter::try_new(Vec::new(), schema(), None).unwrap();
        writer.write(&batch).unwrap();
        let bytes = writer.into_inner().unwrap();
        let error = read(bytes::Bytes::from(bytes)).unwrap_err().to_string();
        assert!(error.contains("this engine reads version 1"), "{error}");
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn sample() -> Vec<ArchivedTask> {
        vec![
            ArchivedTask {
                tenant_id: Uuid::from_u128(1),
                task_id: Uuid::from_u128(10),
                status: "failed".into(),
                inserted_at: at("2026-11-01T10:00:00Z"),
                finished_at: Some(at("2026-11-01T10:05:00.123456Z")),
                payload: Some(r#"{"amount": 12}"#.into()),
                events: vec![
                    ArchivedEvent {
                        id: 7,
                        event_type: "started".into(),
                        created_at: at("2026-11-01T10:00:01Z"),
                        data: None,
                    },
                    ArchivedEvent {
                        id: 8,
                        event_type: "failed".into(),
                        created_at: at("2026-11-01T10:05:00Z"),
                        data: Some(r#"{"error": "card declined"}"#.into()),
                    },
                ],
                payloads: vec![ArchivedPayload {
                    id: 3,
                    kind: "input".into(),
                    location: "inline".into(),
                    inline_content: Some(vec![0, 1, 2, 255]),
                    external_key: None,
                    size_bytes: 4,
                    created_at: at("2026-11-01T10:00:00Z"),
                }],
                logs: vec![ArchivedLog {
                    id: 5,
                    created_at: at("2026-11-01T10:04:00Z"),
                    level: "error".into(),
                    line: "declined by the issuer".into(),
                }],
            },
            ArchivedTask {
                tenant_id: Uuid::from_u128(1),
                task_id: Uuid::from_u128(11),
                status: "succeeded".into(),
                inserted_at: at("2026-11-01T11:00:00Z"),
                finished_at: None,
                payload: None,
                events: vec![],
                payloads: vec![],
                logs: vec![],
            },
        ]
    }

    #[test]
    fn the_same_rows_make_the_same_bytes() {
        let write = || {
            let mut file = FileWriter::new().unwrap();
            file.write(&sample()).unwrap();
            file.finish().unwrap()
        };
        let (a, b) = (write(), write());
        assert_eq!(a, b);
        assert_eq!(&a[..4], b"PAR1");
    }

    #[test]
    fn a_file_reads_back_with_its_rows_and_version() {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let mut file = FileWriter::new().unwrap();
        file.write(&sample()).unwrap();
        assert_eq!(file.tasks(), 2);
        let bytes = bytes::Bytes::from(file.finish().unwrap());
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
        let version = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap()
            .iter()
            .find(|kv| kv.key == SCHEMA_VERSION_KEY)
            .and_then(|kv| kv.value.clone());
        assert_eq!(version.as_deref(), Some("1"));
        let batches: Vec<RecordBatch> = builder.build().unwrap().map(Result::unwrap).collect();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0], batch(&sample()).unwrap());
    }
}
