//! Per-feature statistics that merge: count, min, max, sum and sum of squares per element.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int64Type};
use arrow_array::RecordBatch;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub count: u64,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
    pub sum: Vec<f64>,
    pub sumsq: Vec<f64>,
}

impl Moments {
    pub fn new(width: usize) -> Moments {
        Moments {
            count: 0,
            min: vec![f64::INFINITY; width],
            max: vec![f64::NEG_INFINITY; width],
            sum: vec![0.0; width],
            sumsq: vec![0.0; width],
        }
    }

    pub fn add(&mut self, values: impl Iterator<Item = f64>) {
        for (i, v) in values.enumerate().take(self.sum.len()) {
            self.min[i] = self.min[i].min(v);
            self.max[i] = self.max[i].max(v);
            self.sum[i] += v;
            self.sumsq[i] += v * v;
        }
        self.count += 1;
    }

    pub fn merge(&mut self, o: &Moments) {
        for i in 0..self.sum.len().min(o.sum.len()) {
            self.min[i] = self.min[i].min(o.min[i]);
            self.max[i] = self.max[i].max(o.max[i]);
            self.sum[i] += o.sum[i];
            self.sumsq[i] += o.sumsq[i];
        }
        self.count += o.count;
    }

    pub fn mean(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        self.sum.iter().map(|s| s / n).collect()
    }

    pub fn std(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        self.sum
            .iter()
            .zip(&self.sumsq)
            .map(|(s, q)| (q / n - (s / n) * (s / n)).max(0.0).sqrt())
            .collect()
    }

    /// LeRobot's stats entry: `{min, max, mean, std, count}`.
    pub fn to_json(&self) -> Value {
        json!({"min": self.min, "max": self.max, "mean": self.mean(), "std": self.std(), "count": [self.count]})
    }
}

/// Add rows `rows` of column `name` (a float32 fixed-size list, a float32 or an int64 column),
/// read straight from the column's values.
pub fn add_rows(m: &mut Moments, batch: &RecordBatch, name: &str, rows: std::ops::Range<usize>) {
    let Some(col) = batch.column_by_name(name) else {
        return;
    };
    if let Some(list) = col.as_fixed_size_list_opt() {
        let w = list.value_length() as usize;
        let Some(v) = list.values().as_primitive_opt::<Float32Type>() else {
            return;
        };
        let values = v.values();
        for r in rows {
            let at = list.value_offset(r) as usize;
            m.add(values[at..at + w].iter().map(|x| *x as f64));
        }
    } else if let Some(v) = col.as_primitive_opt::<Float32Type>() {
        rows.for_each(|r| m.add(std::iter::once(v.value(r) as f64)));
    } else if let Some(v) = col.as_primitive_opt::<Int64Type>() {
        rows.for_each(|r| m.add(std::iter::once(v.value(r) as f64)));
    }
}
