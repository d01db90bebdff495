//! Arrow arrays → `Value` rows, borrowing string data from the arrays.

use std::borrow::Cow;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Fields};

use crate::value::Value;

/// The type every column is cast to before reading: 64-bit numbers, Utf8 text, List lists.
pub(crate) fn reading_type(dt: &DataType, name: &str) -> Result<DataType, String> {
    Ok(match dt {
        DataType::Null | DataType::Boolean | DataType::Utf8 => dt.clone(),
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => DataType::Int64,
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => DataType::UInt64,
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) => DataType::Float64,
        DataType::LargeUtf8 | DataType::Utf8View => DataType::Utf8,
        DataType::Dictionary(_, v) if matches!(**v, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) => {
            DataType::Utf8
        }
        DataType::List(f) | DataType::LargeList(f) | DataType::ListView(f) | DataType::FixedSizeList(f, _) => {
            DataType::List(Arc::new(Field::new(f.name(), reading_type(f.data_type(), name)?, true)))
        }
        DataType::Struct(fields) => DataType::Struct(
            fields
                .iter()
                .map(|f| Ok(Field::new(f.name(), reading_type(f.data_type(), name)?, true)))
                .collect::<Result<Fields, String>>()?,
        ),
        DataType::Date32 | DataType::Date64 | DataType::Timestamp(..) | DataType::Time32(_) | DataType::Time64(_) => {
            DataType::Utf8
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            return Err(format!(
                "column '{name}' holds binary data (images as bytes?); prefops carries image references \
                 (paths or URLs): map a reference column instead, e.g. --map image_0_url=<your column>"
            ))
        }
        other => return Err(format!("column '{name}' has unsupported Arrow type {other}")),
    })
}

/// A column ready for row access.
pub(crate) enum Col<'a> {
    Null,
    Bool(&'a arrow_array::BooleanArray),
    Int(&'a arrow_array::Int64Array),
    UInt(&'a arrow_array::UInt64Array),
    Float(&'a arrow_array::Float64Array),
    Str(&'a arrow_array::StringArray),
    List(&'a arrow_array::ListArray, Box<Col<'a>>),
    Struct(&'a arrow_array::StructArray, Vec<(&'a str, Col<'a>)>),
}

impl<'a> Col<'a> {
    pub(crate) fn new(array: &'a ArrayRef) -> Col<'a> {
        match array.data_type() {
            DataType::Null => Col::Null,
            DataType::Boolean => Col::Bool(array.as_boolean()),
            DataType::Int64 => Col::Int(array.as_primitive::<Int64Type>()),
            DataType::UInt64 => Col::UInt(array.as_primitive::<UInt64Type>()),
            DataType::Float64 => Col::Float(array.as_primitive::<Float64Type>()),
            DataType::Utf8 => Col::Str(array.as_string::<i32>()),
            DataType::List(_) => {
                let list = array.as_list::<i32>();
                Col::List(list, Box::new(Col::new(list.values())))
            }
            DataType::Struct(fields) => {
                let s = array.as_struct();
                Col::Struct(
                    s,
                    fields.iter().zip(s.columns()).map(|(f, c)| (f.name().as_str(), Col::new(c))).collect(),
                )
            }
            other => unreachable!("reading_type produced {other}"),
        }
    }

    pub(crate) fn value(&self, i: usize) -> Value<'a> {
        match self {
            Col::Null => Value::Null,
            Col::Bool(a) => if a.is_null(i) { Value::Null } else { Value::Bool(a.value(i)) },
            Col::Int(a) => if a.is_null(i) { Value::Null } else { Value::Int(a.value(i)) },
            Col::UInt(a) => if a.is_null(i) { Value::Null } else { Value::UInt(a.value(i)) },
            Col::Float(a) => if a.is_null(i) { Value::Null } else { Value::Float(a.value(i)) },
            Col::Str(a) => if a.is_null(i) { Value::Null } else { Value::Str(Cow::Borrowed(a.value(i))) },
            Col::List(a, child) => {
                if a.is_null(i) {
                    return Value::Null;
                }
                let offsets = a.value_offsets();
                let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
                Value::List((start..end).map(|j| child.value(j)).collect())
            }
            Col::Struct(a, fields) => {
                if a.is_null(i) {
                    return Value::Null;
                }
                Value::Object(fields.iter().map(|(name, c)| (Cow::Borrowed(*name), c.value(i))).collect())
            }
        }
    }
}

/// Cast a batch's columns to the reading types. Keep the result alive while rows borrow from it.
pub fn prepare_batch(batch: &RecordBatch) -> Result<Vec<(String, ArrayRef)>, String> {
    let schema = batch.schema();
    schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(field, col)| {
            let target = reading_type(field.data_type(), field.name())?;
            let col = if &target == col.data_type() {
                col.clone()
            } else {
                arrow_cast::cast(col, &target).map_err(|e| format!("column '{}': {e}", field.name()))?
            };
            Ok((field.name().clone(), col))
        })
        .collect()
}

/// Prepared columns ready for row access.
pub(crate) fn columns(columns: &[(String, ArrayRef)]) -> Vec<(&str, Col<'_>)> {
    columns.iter().map(|(n, a)| (n.as_str(), Col::new(a))).collect()
}

/// Row i as an object.
pub(crate) fn row<'a>(cols: &[(&'a str, Col<'a>)], i: usize) -> Value<'a> {
    Value::Object(cols.iter().map(|(name, c)| (Cow::Borrowed(*name), c.value(i))).collect())
}

/// Rows of prepared columns as objects.
pub fn rows<'a>(columns: &'a [(String, ArrayRef)]) -> impl Iterator<Item = Value<'a>> + 'a {
    let cols = self::columns(columns);
    let n = columns.first().map_or(0, |(_, a)| a.len());
    (0..n).map(move |i| row(&cols, i))
}
