//! `Value` rows → Arrow record batches, with type inference and schema unification.

use std::sync::Arc;

use arrow_array::builder::{BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, UInt64Builder};
use arrow_array::{new_null_array, Array, ArrayRef, ListArray, NullArray, RecordBatch, StructArray};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};

use crate::value::Value;

static NULL: Value<'static> = Value::Null;

fn type_of(v: &Value<'_>) -> DataType {
    match v {
        Value::Null => DataType::Null,
        Value::Bool(_) => DataType::Boolean,
        Value::Int(_) => DataType::Int64,
        Value::UInt(_) => DataType::UInt64,
        Value::Float(_) => DataType::Float64,
        Value::Str(_) => DataType::Utf8,
        Value::List(items) => {
            let item = items.iter().map(type_of).fold(DataType::Null, |a, b| merge(&a, &b));
            DataType::List(Arc::new(Field::new("item", item, true)))
        }
        Value::Object(fields) => DataType::Struct(
            fields.iter().map(|(k, v)| Field::new(k.as_ref(), type_of(v), true)).collect(),
        ),
    }
}

/// The narrowest type holding both; text (values written as JSON) when nothing else does.
pub fn merge(a: &DataType, b: &DataType) -> DataType {
    use DataType::*;
    match (a, b) {
        (x, y) if x == y => x.clone(),
        (Null, x) | (x, Null) => x.clone(),
        (Int64 | UInt64 | Float64, Int64 | UInt64 | Float64) => Float64,
        (List(fa), List(fb)) => {
            List(Arc::new(Field::new("item", merge(fa.data_type(), fb.data_type()), true)))
        }
        (Struct(fa), Struct(fb)) => {
            let mut out: Vec<Field> = fa.iter().map(|f| f.as_ref().clone()).collect();
            for f in fb.iter() {
                match out.iter_mut().find(|o| o.name() == f.name()) {
                    Some(o) => *o = Field::new(f.name(), merge(o.data_type(), f.data_type()), true),
                    None => out.push(f.as_ref().clone()),
                }
            }
            Struct(Fields::from(out))
        }
        _ => Utf8,
    }
}

fn build(dt: &DataType, values: &[&Value<'_>]) -> ArrayRef {
    match dt {
        DataType::Null => Arc::new(NullArray::new(values.len())),
        DataType::Boolean => {
            let mut b = BooleanBuilder::with_capacity(values.len());
            values.iter().for_each(|v| b.append_option(if let Value::Bool(x) = v { Some(*x) } else { None }));
            Arc::new(b.finish())
        }
        DataType::Int64 => {
            let mut b = Int64Builder::with_capacity(values.len());
            values.iter().for_each(|v| b.append_option(if let Value::Int(x) = v { Some(*x) } else { None }));
            Arc::new(b.finish())
        }
        DataType::UInt64 => {
            let mut b = UInt64Builder::with_capacity(values.len());
            values.iter().for_each(|v| b.append_option(if let Value::UInt(x) = v { Some(*x) } else { None }));
            Arc::new(b.finish())
        }
        DataType::Float64 => {
            let mut b = Float64Builder::with_capacity(values.len());
            values.iter().for_each(|v| b.append_option(v.as_f64()));
            Arc::new(b.finish())
        }
        DataType::Utf8 => {
            let mut b = StringBuilder::with_capacity(values.len(), values.len() * 32);
            for v in values {
                match v {
                    Value::Null => b.append_null(),
                    Value::Str(s) => b.append_value(s),
                    other => b.append_value(other.to_json()),
                }
            }
            Arc::new(b.finish())
        }
        DataType::List(field) => {
            let mut offsets = Vec::with_capacity(values.len() + 1);
            offsets.push(0i32);
            let mut items: Vec<&Value<'_>> = Vec::new();
            let mut valid = Vec::with_capacity(values.len());
            for v in values {
                if let Value::List(xs) = v {
                    items.extend(xs.iter());
                    valid.push(true);
                } else {
                    valid.push(false);
                }
                offsets.push(items.len() as i32);
            }
            let child = build(field.data_type(), &items);
            Arc::new(ListArray::new(
                field.clone(),
                OffsetBuffer::new(offsets.into()),
                child,
                Some(NullBuffer::from(valid)),
            ))
        }
        DataType::Struct(fields) => {
            if fields.is_empty() {
                return Arc::new(StructArray::new_empty_fields(values.len(), None));
            }
            let valid: Vec<bool> = values.iter().map(|v| matches!(v, Value::Object(_))).collect();
            let children: Vec<ArrayRef> = fields
                .iter()
                .map(|f| {
                    let col: Vec<&Value<'_>> =
                        values.iter().map(|v| v.get(f.name()).unwrap_or(&NULL)).collect();
                    build(f.data_type(), &col)
                })
                .collect();
            Arc::new(StructArray::new(fields.clone(), children, Some(NullBuffer::from(valid))))
        }
        other => unreachable!("inference produced {other}"),
    }
}

/// Build a batch from row objects. Columns appear in first-seen order; `hints` fix the type of
/// known columns (so a chunk of all-null scores is still Float64).
pub fn rows_to_batch(rows: &[Value<'_>], hints: &[(&str, DataType)]) -> RecordBatch {
    let mut names: Vec<&str> = Vec::new();
    for row in rows {
        if let Value::Object(fields) = row {
            for (k, _) in fields {
                if !names.contains(&k.as_ref()) {
                    names.push(k.as_ref());
                }
            }
        }
    }
    let mut fields = Vec::with_capacity(names.len());
    let mut columns = Vec::with_capacity(names.len());
    for name in names {
        let col: Vec<&Value<'_>> = rows.iter().map(|r| r.get(name).unwrap_or(&NULL)).collect();
        let dt = match hints.iter().find(|(n, _)| *n == name) {
            Some((_, dt)) => dt.clone(),
            None => col.iter().map(|v| type_of(v)).fold(DataType::Null, |a, b| merge(&a, &b)),
        };
        columns.push(build(&dt, &col));
        fields.push(Field::new(name, dt, true));
    }
    let schema = Arc::new(Schema::new(fields));
    RecordBatch::try_new_with_options(
        schema,
        columns,
        &arrow_array::RecordBatchOptions::new().with_row_count(Some(rows.len())),
    )
    .expect("built columns match their schema")
}

/// The schema holding every batch's columns (in first-seen order) with merged types.
pub fn merged_schema<'b>(batches: impl IntoIterator<Item = &'b RecordBatch>) -> SchemaRef {
    let mut fields: Vec<Field> = Vec::new();
    for b in batches {
        for f in b.schema().fields() {
            match fields.iter_mut().find(|o| o.name() == f.name()) {
                Some(o) => *o = Field::new(f.name(), merge(o.data_type(), f.data_type()), true),
                None => fields.push(Field::new(f.name(), f.data_type().clone(), true)),
            }
        }
    }
    Arc::new(Schema::new(fields))
}

/// Cast a batch to `schema`: missing columns become nulls; a column that appears only now, or
/// whose type cannot be cast losslessly, is an error naming it.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, String> {
    let bs = batch.schema();
    for f in bs.fields() {
        if schema.field_with_name(f.name()).is_err() {
            return Err(format!(
                "column '{}' first appears here, after the output schema was fixed from earlier rows \
                 ({}); write JSONL instead, or make the column present in the first rows",
                f.name(),
                schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let columns = schema
        .fields()
        .iter()
        .map(|f| match bs.index_of(f.name()) {
            Err(_) => Ok(new_null_array(f.data_type(), batch.num_rows())),
            Ok(i) => {
                let col = batch.column(i);
                if col.data_type() == f.data_type() {
                    return Ok(col.clone());
                }
                if &merge(f.data_type(), col.data_type()) != f.data_type() {
                    return Err(format!(
                        "column '{}' is {} here but {} in earlier rows",
                        f.name(),
                        col.data_type(),
                        f.data_type()
                    ));
                }
                arrow_cast::cast(col, f.data_type()).map_err(|e| format!("column '{}': {e}", f.name()))
            }
        })
        .collect::<Result<Vec<_>, String>>()?;
    RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &arrow_array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arrow_in;

    #[test]
    fn round_trip_rows_through_arrow() {
        let text = r#"[{"a":1,"b":"x","c":[{"role":"user","content":"hi"}],"d":null,"e":[1.5,2]},
                       {"a":2,"b":null,"c":[],"e":[],"f":true}]"#;
        let rows: Vec<Value> = serde_json::from_str(text).unwrap();
        let batch = rows_to_batch(&rows, &[]);
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema().field_with_name("e").unwrap().data_type(),
                   &DataType::List(Arc::new(Field::new("item", DataType::Float64, true))));
        let prepared = arrow_in::prepare_batch(&batch).unwrap();
        let back: Vec<Value> = arrow_in::rows(&prepared).collect();
        assert_eq!(back[0].get("c"), rows[0].get("c"));
        assert_eq!(back[1].get("f"), Some(&Value::Bool(true)));
        assert_eq!(back[0].get("e"), Some(&Value::List(vec![Value::Float(1.5), Value::Float(2.0)])));
    }

    #[test]
    fn conform_widens_nulls_and_rejects_conflicts() {
        let a: Vec<Value> = serde_json::from_str(r#"[{"x":1,"y":null}]"#).unwrap();
        let b: Vec<Value> = serde_json::from_str(r#"[{"x":2.5,"y":"s"}]"#).unwrap();
        let (ba, bb) = (rows_to_batch(&a, &[]), rows_to_batch(&b, &[]));
        let schema = merged_schema([&ba, &bb]);
        assert_eq!(schema.field_with_name("x").unwrap().data_type(), &DataType::Float64);
        assert!(conform(&ba, &schema).is_ok());
        let c: Vec<Value> = serde_json::from_str(r#"[{"x":"text"}]"#).unwrap();
        let err = conform(&rows_to_batch(&c, &[]), &schema).unwrap_err();
        assert!(err.contains("column 'x'"), "{err}");
        let d: Vec<Value> = serde_json::from_str(r#"[{"z":1}]"#).unwrap();
        assert!(conform(&rows_to_batch(&d, &[]), &schema).unwrap_err().contains("'z' first appears"));
    }
}
