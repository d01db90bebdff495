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
use arrow_buffer::{ArrowNativeType, BooleanBufferBuilder, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{ArrowError, DataType};

/// How many rows ahead the copy loop asks for a value's bytes. Far enough to cover a memory
/// access at this loop's pace, near enough that the line is still cached when reached.
const PREFETCH_ROWS: usize = 16;

/// Values up to this many bytes are copied as one fixed-size block.
const SHORT_COPY: usize = 128;

/// `interleave(arrays, indices)`: row `i` of the result is row `indices[i].1` of
/// `arrays[indices[i].0]`. All arrays must share one data type.
pub fn gather(arrays: &[&dyn Array], indices: &[(usize, usize)]) -> Result<ArrayRef, ArrowError> {
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
fn prefetch(ptr: *const u8) {
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
    check_indices(arrays, indices)?;
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
    check_indices(arrays, indices)?;
    let values: Vec<&BooleanArray> = arrays.iter().map(|a| a.as_boolean()).collect();
    let mut out = BooleanBufferBuilder::new(indices.len());
    for &(a, b) in indices {
        out.append(values[a].value(b));
    }
    Ok(Arc::new(BooleanArray::new(out.finish(), gather_nulls(arrays, indices))))
}

fn gather_bytes<T: ByteArrayType>(arrays: &[&dyn Array], indices: &[(usize, usize)]) -> Result<ArrayRef, ArrowError> {
    check_indices(arrays, indices)?;
    let nulls = gather_nulls(arrays, indices);
    let arrays: Vec<&GenericByteArray<T>> = arrays.iter().map(|a| a.as_bytes::<T>()).collect();

    // Pass 1: where each value lies, and the output offsets. Each source is a window of the
    // value's buffer that starts at the value and holds it, and up to SHORT_COPY bytes when
    // the buffer has them, so that a short value can be copied as a fixed-size block.
    let mut sources: Vec<(&[u8], usize)> = Vec::with_capacity(indices.len());
    let mut offsets: Vec<T::Offset> = Vec::with_capacity(indices.len() + 1);
    let mut length = 0usize;
    offsets.push(T::Offset::default());
    for (i, &(a, b)) in indices.iter().enumerate() {
        if let Some(&(na, nb)) = indices.get(i + PREFETCH_ROWS) {
            prefetch(arrays[na].value_offsets()[nb..].as_ptr() as *const u8);
        }
        let array = arrays[a];
        let (o, data) = (array.value_offsets(), array.value_data());
        let (start, end) = (o[b].as_usize(), o[b + 1].as_usize());
        sources.push((&data[start..end.max((start + SHORT_COPY).min(data.len()))], end - start));
        length += end - start;
        offsets.push(T::Offset::from_usize(length).ok_or_else(|| ArrowError::OffsetOverflowError(length))?);
    }

    // Pass 2: the bytes, prefetching ahead. A short value is copied as a 16, 32, 64 or 128-byte
    // block (a few vector moves instead of a memcpy call); the block's tail lands in space
    // that the next values overwrite, or in the SHORT_COPY bytes of slack at the end.
    let mut values: Vec<u8> = Vec::with_capacity(length + SHORT_COPY);
    let out = values.as_mut_ptr();
    let mut pos = 0usize;
    for (i, &(window, len)) in sources.iter().enumerate() {
        if let Some((next, _)) = sources.get(i + PREFETCH_ROWS) {
            prefetch(next.as_ptr());
        }
        let (n, w) = (len, window.len());
        // SAFETY: `window` is a slice, so its first `w` bytes may be read; every copy below
        // reads at most `w` of them. It writes at most max(n, SHORT_COPY) bytes from `pos`,
        // and pos + n <= length, so within the capacity of length + SHORT_COPY.
        unsafe {
            let (src, dst) = (window.as_ptr(), out.add(pos));
            if n <= 16 && w >= 16 {
                std::ptr::copy_nonoverlapping(src, dst, 16);
            } else if n <= 32 && w >= 32 {
                std::ptr::copy_nonoverlapping(src, dst, 32);
            } else if n <= 64 && w >= 64 {
                std::ptr::copy_nonoverlapping(src, dst, 64);
            } else if n <= SHORT_COPY && w >= SHORT_COPY {
                std::ptr::copy_nonoverlapping(src, dst, SHORT_COPY);
            } else {
                std::ptr::copy_nonoverlapping(src, dst, n);
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
