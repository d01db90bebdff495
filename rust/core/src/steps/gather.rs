//! Rows gathered from several arrays into one, in a given order (`arrow_select`'s
//! `interleave`), and rows picked from one of two arrays by a mask (its `zip`), with faster
//! paths for the column types of pairs tables. Same results, value for value and null for null.
//!
//! A curriculum order is random with respect to the input, so gathering a text column is a
//! cache miss per row (offsets, then bytes). `interleave` copies each value as soon as it
//! finds it, one miss after the other; here the first pass records where each value lies and
//! the second copies them while prefetching the bytes of values a few rows ahead, so the
//! misses overlap.
//!
//! `zip` on text goes through arrow's generic `MutableArrayData`, whose per-run bookkeeping
//! was a fifth of a random flip (rate 0.1: a run every five rows); [`zip`] copies each run's
//! bytes with one memcpy and writes its offsets in a plain loop.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    BinaryType, ByteArrayType, Float32Type, Float64Type, Int32Type, Int64Type, LargeBinaryType, LargeUtf8Type, Utf8Type,
};
use arrow_array::{Array, ArrayRef, ArrowPrimitiveType, BooleanArray, GenericByteArray, PrimitiveArray};
use arrow_buffer::{ArrowNativeType, BooleanBuffer, BooleanBufferBuilder, Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{ArrowError, DataType};

/// How many rows ahead the copy loop asks for a value's bytes. Far enough to cover a memory
/// access at this loop's pace, near enough that the line is still cached when reached.
const PREFETCH_ROWS: usize = 16;

/// Values up to this many bytes are copied as two fixed-size blocks (see `copy_block`).
const SHORT_COPY: usize = 128;

/// Copy `n` bytes, `B <= n <= 2 * B`, as two `B`-byte blocks: one from the start and one
/// ending at the end (they overlap when n < 2B).
///
/// # Safety
/// `src` must be valid for reading and `dst` for writing `n` bytes, and the two must not overlap.
#[inline(always)]
unsafe fn copy_block<const B: usize>(src: *const u8, dst: *mut u8, n: usize) {
    debug_assert!(B <= n && n <= 2 * B);
    std::ptr::copy_nonoverlapping(src, dst, B);
    std::ptr::copy_nonoverlapping(src.add(n - B), dst.add(n - B), B);
}

/// `interleave(arrays, indices)`: row `i` of the result is row `indices[i].1` of
/// `arrays[indices[i].0]`. All arrays must share one data type.
pub fn gather(arrays: &[&dyn Array], indices: &[(usize, usize)]) -> Result<ArrayRef, ArrowError> {
    check_indices(arrays, indices)?;
    gather_checked(arrays, indices)
}

/// [`gather`] of the same rows from each column of a table: `columns[c][a]` is column `c` of
/// batch `a`. The indices are checked once when every column has the same lengths.
pub fn gather_columns(columns: &[Vec<&dyn Array>], indices: &[(usize, usize)]) -> Result<Vec<ArrayRef>, ArrowError> {
    let Some(first) = columns.first() else {
        return Ok(Vec::new());
    };
    let same_lengths = columns
        .iter()
        .all(|c| c.len() == first.len() && c.iter().zip(first).all(|(a, b)| a.len() == b.len()));
    if !same_lengths {
        return columns.iter().map(|arrays| gather(arrays, indices)).collect();
    }
    check_indices(first, indices)?;
    columns.iter().map(|arrays| gather_checked(arrays, indices)).collect()
}

/// [`gather`] with indices already checked against the arrays' lengths.
fn gather_checked(arrays: &[&dyn Array], indices: &[(usize, usize)]) -> Result<ArrayRef, ArrowError> {
    let Some(first) = arrays.first() else {
        return Err(ArrowError::InvalidArgumentError("gather needs at least one array".into()));
    };
    let data_type = first.data_type();
    if arrays.iter().any(|a| a.data_type() != data_type) {
        return arrow_select::interleave::interleave(arrays, indices);
    }
    match data_type {
        DataType::Utf8 => gather_bytes::<Utf8Type>(arrays, indices),
        DataType::LargeUtf8 => gather_bytes::<LargeUtf8Type>(arrays, indices),
        DataType::Binary => gather_bytes::<BinaryType>(arrays, indices),
        DataType::LargeBinary => gather_bytes::<LargeBinaryType>(arrays, indices),
        DataType::Float64 => gather_primitive::<Float64Type>(arrays, indices),
        DataType::Float32 => gather_primitive::<Float32Type>(arrays, indices),
        DataType::Int64 => gather_primitive::<Int64Type>(arrays, indices),
        DataType::Int32 => gather_primitive::<Int32Type>(arrays, indices),
        DataType::Boolean => gather_boolean(arrays, indices),
        _ => arrow_select::interleave::interleave(arrays, indices),
    }
}

/// `zip(mask, truthy, falsy)`: row `i` from `truthy` where `mask[i]`, else from `falsy`.
pub fn zip(mask: &BooleanArray, truthy: &dyn Array, falsy: &dyn Array) -> Result<ArrayRef, ArrowError> {
    let simple = truthy.data_type() == falsy.data_type()
        && mask.null_count() == 0
        && truthy.len() == mask.len()
        && falsy.len() == mask.len();
    match truthy.data_type() {
        DataType::Utf8 if simple => zip_bytes::<Utf8Type>(mask, truthy, falsy),
        DataType::LargeUtf8 if simple => zip_bytes::<LargeUtf8Type>(mask, truthy, falsy),
        DataType::Binary if simple => zip_bytes::<BinaryType>(mask, truthy, falsy),
        DataType::LargeBinary if simple => zip_bytes::<LargeBinaryType>(mask, truthy, falsy),
        _ => arrow_select::zip::zip(mask, &truthy, &falsy),
    }
}

fn zip_bytes<T: ByteArrayType>(mask: &BooleanArray, truthy: &dyn Array, falsy: &dyn Array) -> Result<ArrayRef, ArrowError> {
    let n = mask.len();
    let sides = [falsy.as_bytes::<T>(), truthy.as_bytes::<T>()];
    // Runs of rows from one side: (side, start, end), in row order.
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    let mut done = 0;
    for (start, end) in mask.values().set_slices() {
        if start > done {
            runs.push((0, done, start));
        }
        runs.push((1, start, end));
        done = end;
    }
    if done < n {
        runs.push((0, done, n));
    }
    let span = |&(side, start, end): &(usize, usize, usize)| {
        let o = sides[side].value_offsets();
        (o[start].as_usize(), o[end].as_usize())
    };
    let length: usize = runs.iter().map(&span).map(|(a, b)| b - a).sum();
    T::Offset::from_usize(length).ok_or_else(|| ArrowError::OffsetOverflowError(length))?;

    let mut offsets: Vec<T::Offset> = Vec::with_capacity(n + 1);
    let mut values: Vec<u8> = Vec::with_capacity(length);
    offsets.push(T::Offset::default());
    for run in &runs {
        let &(side, start, end) = run;
        let (from, to) = span(run);
        let o = &sides[side].value_offsets()[start + 1..=end];
        // Every offset is at most `length`, checked above to fit the offset type.
        let base = values.len();
        offsets.extend(o.iter().map(|x| T::Offset::from_usize(base + (x.as_usize() - from)).expect("fits")));
        values.extend_from_slice(&sides[side].value_data()[from..to]);
    }

    let nulls = if sides.iter().any(|a| a.null_count() > 0) {
        let mut valid = BooleanBufferBuilder::new(n);
        for i in 0..n {
            valid.append(sides[mask.value(i) as usize].is_valid(i));
        }
        Some(NullBuffer::new(valid.finish())).filter(|x| x.null_count() > 0)
    } else {
        None
    };
    // SAFETY: offsets start at 0, never decrease (each run's are its source's, shifted) and
    // end at values.len(); the bytes are whole values of arrays of this type.
    let array = unsafe {
        GenericByteArray::<T>::new_unchecked(OffsetBuffer::new_unchecked(ScalarBuffer::from(offsets)), values.into(), nulls)
    };
    Ok(Arc::new(array))
}

#[inline(always)]
pub(crate) fn prefetch(ptr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

fn check_indices(arrays: &[&dyn Array], indices: &[(usize, usize)]) -> Result<(), ArrowError> {
    let lens: Vec<usize> = arrays.iter().map(|a| a.len()).collect();
    for &(a, b) in indices {
        match lens.get(a) {
            Some(&len) if b < len => {}
            Some(&len) => {
                return Err(ArrowError::InvalidArgumentError(format!(
                    "gather index ({a}, {b}): row {b} is out of range of array {a}'s {len} rows"
                )))
            }
            None => {
                return Err(ArrowError::InvalidArgumentError(format!(
                    "gather index ({a}, {b}): array {a} is out of range of {} arrays",
                    arrays.len()
                )))
            }
        }
    }
    Ok(())
}

/// The validity of the gathered rows, or None when none is null.
fn gather_nulls(arrays: &[&dyn Array], indices: &[(usize, usize)]) -> Option<NullBuffer> {
    if arrays.iter().all(|a| a.null_count() == 0) {
        return None;
    }
    let mut valid = BooleanBufferBuilder::new(indices.len());
    for &(a, b) in indices {
        valid.append(arrays[a].is_valid(b));
    }
    Some(NullBuffer::new(valid.finish())).filter(|n| n.null_count() > 0)
}

fn gather_primitive<T: ArrowPrimitiveType>(arrays: &[&dyn Array], indices: &[(usize, usize)]) -> Result<ArrayRef, ArrowError> {
    let values: Vec<&[T::Native]> = arrays.iter().map(|a| a.as_primitive::<T>().values().as_ref()).collect();
    let mut out: Vec<T::Native> = Vec::with_capacity(indices.len());
    for (i, &(a, b)) in indices.iter().enumerate() {
        if let Some(&(na, nb)) = indices.get(i + PREFETCH_ROWS) {
            prefetch(values[na][nb..].as_ptr() as *const u8);
        }
        out.push(values[a][b]);
    }
    // `gather` sends only T's own data type here (not timestamps or decimals), so T's default is it.
    let array = PrimitiveArray::<T>::new(out.into(), gather_nulls(arrays, indices));
    Ok(Arc::new(array))
}

fn gather_boolean(arrays: &[&dyn Array], indices: &[(usize, usize)]) -> Result<ArrayRef, ArrowError> {
    // Each source's packed bits and its bit offset; the result is built 64 bits at a time.
    let sources: Vec<(&[u8], usize)> = arrays
        .iter()
        .map(|a| {
            let bits = a.as_boolean().values();
            (bits.values(), bits.offset())
        })
        .collect();
    let mut words: Vec<u64> = Vec::with_capacity(indices.len().div_ceil(64));
    for chunk in indices.chunks(64) {
        let mut word = 0u64;
        for (k, &(a, b)) in chunk.iter().enumerate() {
            let (bytes, offset) = sources[a];
            let i = offset + b;
            word |= u64::from((bytes[i / 8] >> (i % 8)) & 1) << k;
        }
        words.push(word);
    }
    let values = BooleanBuffer::new(Buffer::from_vec(words), 0, indices.len());
    Ok(Arc::new(BooleanArray::new(values, gather_nulls(arrays, indices))))
}

fn gather_bytes<T: ByteArrayType>(arrays: &[&dyn Array], indices: &[(usize, usize)]) -> Result<ArrayRef, ArrowError> {
    let nulls = gather_nulls(arrays, indices);
    let arrays: Vec<&GenericByteArray<T>> = arrays.iter().map(|a| a.as_bytes::<T>()).collect();

    // Pass 1: where each value lies, and the output offsets.
    let mut sources: Vec<&[u8]> = Vec::with_capacity(indices.len());
    let mut offsets: Vec<T::Offset> = Vec::with_capacity(indices.len() + 1);
    let mut length = 0usize;
    offsets.push(T::Offset::default());
    for (i, &(a, b)) in indices.iter().enumerate() {
        if let Some(&(na, nb)) = indices.get(i + PREFETCH_ROWS) {
            prefetch(arrays[na].value_offsets()[nb..].as_ptr() as *const u8);
        }
        let array = arrays[a];
        let (o, data) = (array.value_offsets(), array.value_data());
        let value = &data[o[b].as_usize()..o[b + 1].as_usize()];
        sources.push(value);
        length += value.len();
        offsets.push(T::Offset::from_usize(length).ok_or_else(|| ArrowError::OffsetOverflowError(length))?);
    }

    // Pass 2: the bytes, prefetching the first and last line of a value a few rows ahead
    // (a 60-200 byte text spans two or three lines, and a miss on the second would not
    // overlap). A value of up to 128 bytes is copied as two blocks of the largest size it
    // holds, one from its start and one ending at its end, overlapping in the middle: a few
    // vector moves instead of a memcpy call, reading and writing only the value's own bytes.
    let mut values: Vec<u8> = Vec::with_capacity(length);
    let out = values.as_mut_ptr();
    let mut pos = 0usize;
    for (i, value) in sources.iter().enumerate() {
        if let Some(next) = sources.get(i + PREFETCH_ROWS) {
            prefetch(next.as_ptr());
            prefetch(next.as_ptr().wrapping_add(next.len().saturating_sub(1)));
        }
        let n = value.len();
        // SAFETY: every copy below reads within `value` (n bytes) and writes within
        // out[pos..pos + n], which lies within the capacity `length` since the values' lengths
        // sum to it.
        unsafe {
            let (src, dst) = (value.as_ptr(), out.add(pos));
            match n {
                0 => {}
                1 => *dst = *src,
                2..=3 => copy_block::<2>(src, dst, n),
                4..=7 => copy_block::<4>(src, dst, n),
                8..=15 => copy_block::<8>(src, dst, n),
                16..=31 => copy_block::<16>(src, dst, n),
                32..=63 => copy_block::<32>(src, dst, n),
                64..=SHORT_COPY => copy_block::<64>(src, dst, n),
                _ => std::ptr::copy_nonoverlapping(src, dst, n),
            }
        }
        pos += n;
    }
    debug_assert_eq!(pos, length);
    // SAFETY: bytes 0..length were all written above (each value's n bytes, in order).
    unsafe { values.set_len(length) };

    // SAFETY: offsets start at 0, never decrease and end at values.len(); every value was a
    // valid value of an array of this type (valid UTF-8 for strings).
    let array = unsafe {
        GenericByteArray::<T>::new_unchecked(
            OffsetBuffer::new_unchecked(ScalarBuffer::from(offsets)),
            values.into(),
            nulls,
        )
    };
    Ok(Arc::new(array))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::types::TimestampMillisecondType;
    use arrow_array::{
        BinaryArray, Float64Array, Int32Array, Int64Array, LargeStringArray, StringArray, TimestampMillisecondArray,
    };
    use proptest::prelude::*;

    fn check(arrays: &[&dyn Array], indices: &[(usize, usize)]) {
        let want = arrow_select::interleave::interleave(arrays, indices).unwrap();
        let got = gather(arrays, indices).unwrap();
        assert_eq!(got.data_type(), want.data_type());
        assert_eq!(got.to_data(), want.to_data());
        got.to_data().validate_full().unwrap();
    }

    fn texts(values: &[Option<String>]) -> StringArray {
        values.iter().map(|v| v.as_deref()).collect()
    }

    proptest! {
        #[test]
        fn equals_interleave_on_text(
            parts in proptest::collection::vec(
                proptest::collection::vec(proptest::option::weighted(0.8, "[a-zé\"\\\\\n ]{0,90}"), 1..30), 1..5),
            picks in proptest::collection::vec((0usize..1000, 0usize..1000), 0..200),
            slice_from in 0usize..5,
        ) {
            let arrays: Vec<StringArray> = parts.iter().map(|p| texts(p)).collect();
            // Sliced arrays have offsets that do not start at 0.
            let sliced: Vec<StringArray> = arrays
                .iter()
                .map(|a| { let from = slice_from.min(a.len() - 1); a.slice(from, a.len() - from) })
                .collect();
            // Trimmed at the back too: the values buffer holds bytes past the last value,
            // which a short value's fixed-size block may read but must not gather.
            let trimmed: Vec<StringArray> = arrays
                .iter()
                .map(|a| { let from = slice_from.min(a.len() - 1); a.slice(from, (a.len() - from).div_ceil(2)) })
                .collect();
            for set in [&arrays, &sliced, &trimmed] {
                let refs: Vec<&dyn Array> = set.iter().map(|a| a as &dyn Array).collect();
                let indices: Vec<(usize, usize)> =
                    picks.iter().map(|&(a, b)| (a % set.len(), b % set[a % set.len()].len())).collect();
                check(&refs, &indices);
                let large: Vec<LargeStringArray> =
                    set.iter().map(|a| a.iter().collect::<LargeStringArray>()).collect();
                let refs: Vec<&dyn Array> = large.iter().map(|a| a as &dyn Array).collect();
                check(&refs, &indices);
                let binary: Vec<BinaryArray> =
                    set.iter().map(|a| a.iter().map(|v| v.map(str::as_bytes)).collect::<BinaryArray>()).collect();
                let refs: Vec<&dyn Array> = binary.iter().map(|a| a as &dyn Array).collect();
                check(&refs, &indices);
            }
        }
    }

    proptest! {
        #[test]
        fn equals_interleave_on_numbers_and_booleans(
            parts in proptest::collection::vec(
                proptest::collection::vec(proptest::option::weighted(0.8, any::<i64>()), 1..30), 1..5),
            picks in proptest::collection::vec((0usize..1000, 0usize..1000), 0..200),
        ) {
            let indices: Vec<(usize, usize)> =
                picks.iter().map(|&(a, b)| (a % parts.len(), b % parts[a % parts.len()].len())).collect();
            let ints: Vec<Int64Array> = parts.iter().map(|p| Int64Array::from(p.clone())).collect();
            let floats: Vec<Float64Array> =
                parts.iter().map(|p| p.iter().map(|v| v.map(|x| x as f64 / 7.0)).collect()).collect();
            let small: Vec<Int32Array> = parts.iter().map(|p| p.iter().map(|v| v.map(|x| x as i32)).collect()).collect();
            let flags: Vec<BooleanArray> = parts.iter().map(|p| p.iter().map(|v| v.map(|x| x % 3 == 0)).collect()).collect();
            let stamps: Vec<TimestampMillisecondArray> =
                ints.iter().map(|a| a.reinterpret_cast::<TimestampMillisecondType>().with_timezone("UTC")).collect();
            check(&ints.iter().map(|a| a as &dyn Array).collect::<Vec<_>>(), &indices);
            check(&floats.iter().map(|a| a as &dyn Array).collect::<Vec<_>>(), &indices);
            check(&small.iter().map(|a| a as &dyn Array).collect::<Vec<_>>(), &indices);
            check(&flags.iter().map(|a| a as &dyn Array).collect::<Vec<_>>(), &indices);
            check(&stamps.iter().map(|a| a as &dyn Array).collect::<Vec<_>>(), &indices);
        }
    }

    proptest! {
        #[test]
        fn zip_equals_arrow_zip(
            rows in proptest::collection::vec(
                (any::<bool>(), proptest::option::weighted(0.9, "[a-zé]{0,20}"), proptest::option::weighted(0.9, "[xyz]{0,30}")),
                0..200),
            density in 0u32..5,
            slice_from in 0usize..3,
        ) {
            let mask: BooleanArray = rows.iter().enumerate().map(|(i, r)| Some(r.0 || (i as u32 % 5) < density)).collect();
            let a = texts(&rows.iter().map(|r| r.1.clone()).collect::<Vec<_>>());
            let b = texts(&rows.iter().map(|r| r.2.clone()).collect::<Vec<_>>());
            let from = slice_from.min(rows.len());
            let (mask, a, b) = (mask.slice(from, rows.len() - from), a.slice(from, rows.len() - from), b.slice(from, rows.len() - from));
            for (t, f) in [(&a, &b), (&b, &a)] {
                let want = arrow_select::zip::zip(&mask, t, f).unwrap();
                let got = zip(&mask, t, f).unwrap();
                prop_assert_eq!(got.to_data(), want.to_data());
                got.to_data().validate_full().unwrap();
                let (lt, lf): (LargeStringArray, LargeStringArray) = (t.iter().collect(), f.iter().collect());
                prop_assert_eq!(zip(&mask, &lt, &lf).unwrap().to_data(), arrow_select::zip::zip(&mask, &lt, &lf).unwrap().to_data());
            }
        }
    }

    proptest! {
        #[test]
        fn booleans_from_sliced_arrays_and_whole_tables(
            parts in proptest::collection::vec(
                proptest::collection::vec(proptest::option::weighted(0.9, any::<bool>()), 1..150), 1..4),
            picks in proptest::collection::vec((0usize..1000, 0usize..1000), 0..300),
            slice_from in 0usize..9,
        ) {
            // Bit offsets that are not a multiple of 8, and results past one 64-bit word.
            let flags: Vec<BooleanArray> = parts
                .iter()
                .map(|p| { let a = BooleanArray::from(p.clone()); let from = slice_from.min(a.len() - 1); a.slice(from, a.len() - from) })
                .collect();
            let indices: Vec<(usize, usize)> =
                picks.iter().map(|&(a, b)| (a % flags.len(), b % flags[a % flags.len()].len())).collect();
            let flag_refs: Vec<&dyn Array> = flags.iter().map(|a| a as &dyn Array).collect();
            check(&flag_refs, &indices);

            // gather_columns: a table's columns (same lengths per batch) give what gather gives
            // column by column.
            let texts: Vec<StringArray> = flags.iter().map(|a| a.iter().map(|v| v.map(|x| if x { "yes, true" } else { "n" })).collect()).collect();
            let text_refs: Vec<&dyn Array> = texts.iter().map(|a| a as &dyn Array).collect();
            let columns = vec![flag_refs.clone(), text_refs.clone()];
            let got = gather_columns(&columns, &indices).unwrap();
            prop_assert_eq!(got.len(), 2);
            prop_assert_eq!(got[0].to_data(), gather(&flag_refs, &indices).unwrap().to_data());
            prop_assert_eq!(got[1].to_data(), gather(&text_refs, &indices).unwrap().to_data());
        }
    }

    #[test]
    fn gather_columns_checks_indices_and_unequal_lengths() {
        let (a, b) = (Int64Array::from(vec![1, 2, 3]), StringArray::from(vec!["x", "y", "z"]));
        let columns: Vec<Vec<&dyn Array>> = vec![vec![&a], vec![&b]];
        let e = gather_columns(&columns, &[(0, 3)]).unwrap_err();
        assert!(e.to_string().contains("row 3 is out of range of array 0's 3 rows"), "{e}");
        assert!(gather_columns(&columns, &[(1, 0)]).is_err());
        // Columns of unequal lengths are each checked against their own.
        let short = StringArray::from(vec!["x"]);
        let columns: Vec<Vec<&dyn Array>> = vec![vec![&a], vec![&short]];
        assert!(gather_columns(&columns, &[(0, 2)]).is_err());
        let got = gather_columns(&columns, &[(0, 0)]).unwrap();
        assert_eq!(got[1].to_data(), StringArray::from(vec!["x"]).to_data());
        assert!(gather_columns(&[], &[(0, 0)]).unwrap().is_empty());
    }

    #[test]
    fn other_types_and_bad_indices() {
        let a = Int64Array::from(vec![Some(1), None, Some(3)]);
        let b = Int64Array::from(vec![7]);
        check(&[&a, &b], &[(1, 0), (0, 2), (0, 1)]);
        let s = StringArray::from(vec!["x", "y"]);
        assert!(gather(&[&s], &[(0, 2)]).is_err());
        assert!(gather(&[&s], &[(1, 0)]).is_err());
        check(&[&s], &[]);
    }

    #[test]
    fn offsets_past_i32_are_an_error_not_a_wrap() {
        // Checked while sizing, before the values are allocated: 33 picks of a 64 MiB value
        // would need offsets past i32::MAX, and cost no more than the value itself here.
        let big = StringArray::from(vec!["x".repeat(64 << 20)]);
        match gather(&[&big], &[(0, 0); 33]) {
            Err(ArrowError::OffsetOverflowError(n)) => assert!(n > i32::MAX as usize),
            other => panic!("expected an offset overflow, got {other:?}"),
        }
        assert_eq!(gather(&[&big], &[(0, 0); 2]).unwrap().len(), 2); // the total overflows, not the value
    }
}
