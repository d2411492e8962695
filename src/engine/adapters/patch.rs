//! Weights changed in place: every tensor a component was built from is recorded by name as
//! it is loaded (the module and the table share the storage), so a LoRA is merged into the
//! loaded weights without rebuilding anything, and taken out again exactly: every state is
//! computed from the original (`W = W₀ + Σ scale · up · down`), never by subtracting, and
//! the original is read again from where the weights were loaded from (the memory-mapped
//! file, through the same conversion), so no copy of it is kept.
//!
//! The table remembers what each touched tensor holds, so moving from one set of LoRAs and
//! weights to another rewrites only the tensors whose contributions changed, and repeating a
//! job with the same set costs nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// One low-rank term of a weight: `scale · up · down`, reshaped to the weight's shape.
#[derive(Clone)]
pub struct Delta {
    /// Identifies the term (file, module and scale) so unchanged tensors are skipped.
    pub id: String,
    /// [out, rank] (or [out, rank, 1, 1]).
    pub up: Tensor,
    /// [rank, in] (or [rank, in, kh, kw]).
    pub down: Tensor,
    pub scale: f64,
}

impl Delta {
    /// `buf` (a weight of `dims`, row-major f32) += scale · up · down, on the CPU threads.
    fn add_into(&self, buf: &mut [f32], dims: &[usize]) -> candle_core::Result<()> {
        let out = self.up.dim(0)?;
        let rank = self.down.dim(0)?;
        let inner = self.down.elem_count() / rank.max(1);
        if dims.first() != Some(&out)
            || out * inner != buf.len()
            || self.up.elem_count() != out * rank
        {
            candle_core::bail!(
                "LoRA term up {:?} · down {:?} does not fit a weight {dims:?}",
                self.up.dims(),
                self.down.dims()
            );
        }
        let f = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let (up, down) = (f(&self.up)?, f(&self.down)?);
        let threads = rayon::current_num_threads();
        crate::engine::attention::gemm_f32(
            out,
            inner,
            rank,
            buf,
            (inner, 1),
            &up,
            (rank, 1),
            &down,
            (inner, 1),
            true,
            self.scale as f32,
            threads,
        );
        Ok(())
    }

    /// `scale · up · down` in f32 on `device`, shaped as `shape`.
    fn product(&self, shape: &Shape, device: &Device) -> candle_core::Result<Tensor> {
        let up = self.up.to_device(device)?.to_dtype(DType::F32)?;
        let down = self.down.to_device(device)?.to_dtype(DType::F32)?;
        let out = up.dim(0)?;
        let rank = down.dim(0)?;
        let up = up.reshape((out, up.elem_count() / out))?;
        let down = down.reshape((rank, down.elem_count() / rank))?;
        (up.matmul(&down)? * self.scale)?.reshape(shape)
    }
}

/// What a touched tensor holds now: the terms added to its original, and the original
/// itself when there is no source to read it again from.
struct Touched {
    kept: Option<Tensor>,
    terms: Vec<String>,
}

/// The tensors of one component by name, and which of them hold merged terms.
#[derive(Default)]
pub struct WeightTable {
    tensors: Mutex<HashMap<String, Tensor>>,
    touched: Mutex<HashMap<String, Touched>>,
    /// Where the tensors were read from (set by [`WeightTable::recorder`]).
    source: Mutex<Option<VarBuilder<'static>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update below completes before the guard is dropped; a panic elsewhere cannot
    // leave half an entry behind.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What [`WeightTable::apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Tensors rewritten (merged anew or restored).
    pub rewritten: usize,
    /// Tensors that now hold at least one term.
    pub patched: usize,
}

impl WeightTable {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// `vb` with every tensor it serves recorded here under its full name.
    pub fn recorder(self: &Arc<Self>, vb: VarBuilder<'static>) -> VarBuilder<'static> {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        *lock(&self.source) = Some(vb.clone());
        VarBuilder::from_backend(
            Box::new(Recorder {
                source: vb,
                table: self.clone(),
            }),
            dtype,
            device,
        )
    }

    fn record(&self, name: &str, t: &Tensor) {
        lock(&self.tensors).insert(name.to_string(), t.clone());
    }

    /// Names and shapes of the recorded tensors.
    pub fn shapes(&self) -> HashMap<String, Vec<usize>> {
        lock(&self.tensors)
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect()
    }

    /// Makes the weights hold their originals plus `want` (name → terms). Tensors whose
    /// terms are unchanged are left alone; tensors no longer wanted get their original back.
    pub fn apply(&self, want: &HashMap<String, Vec<Delta>>) -> candle_core::Result<Applied> {
        let tensors = lock(&self.tensors);
        let mut touched = lock(&self.touched);
        let source = lock(&self.source).clone();
        // The original of `t` (named `name`): read again from the source, else the kept copy.
        let original = |name: &str, t: &Tensor, kept: Option<&Tensor>| match (&source, kept) {
            (_, Some(k)) => Ok(k.clone()),
            (Some(vb), None) => vb
                .get_unchecked_dtype(name, t.dtype())?
                .to_device(t.device()),
            (None, None) => candle_core::bail!("the original of {name} is gone"),
        };
        let mut done = Applied::default();
        // Restore what is no longer wanted.
        let gone: Vec<String> = touched
            .keys()
            .filter(|k| want.get(*k).is_none_or(|d| d.is_empty()))
            .cloned()
            .collect();
        for name in gone {
            if let (Some(t), Some(entry)) = (tensors.get(&name), touched.remove(&name)) {
                let o = original(&name, t, entry.kept.as_ref())?;
                t.slice_set(&o.contiguous()?, 0, 0)?;
                done.rewritten += 1;
            }
        }
        for (name, terms) in want {
            if terms.is_empty() {
                continue;
            }
            let Some(t) = tensors.get(name) else {
                candle_core::bail!("no weight {name} to merge into");
            };
            let ids: Vec<String> = terms.iter().map(|d| d.id.clone()).collect();
            if touched.get(name).is_some_and(|e| e.terms == ids) {
                done.patched += 1;
                continue;
            }
            let kept = match touched.get(name) {
                Some(e) => e.kept.clone(),
                None if source.is_some() => None,
                None => Some(t.copy()?),
            };
            let base = match (touched.contains_key(name), &kept) {
                // Untouched so far: the tensor holds its original.
                (false, _) => t.clone(),
                (true, k) => original(name, t, k.as_ref())?,
            };
            if t.device().is_cpu() && t.dtype() == DType::F32 {
                // In one buffer: the original, then every term added by the matrix kernel
                // (no temporary per term).
                let mut buf = base.flatten_all()?.to_vec1::<f32>()?;
                for d in terms {
                    d.add_into(&mut buf, t.dims())?;
                }
                t.slice_set(&Tensor::from_vec(buf, t.shape(), t.device())?, 0, 0)?;
            } else {
                let mut merged = base.to_dtype(DType::F32)?;
                for d in terms {
                    merged = (merged + d.product(t.shape(), t.device())?)?;
                }
                t.slice_set(&merged.to_dtype(t.dtype())?.contiguous()?, 0, 0)?;
            }
            touched.insert(name.clone(), Touched { kept, terms: ids });
            done.rewritten += 1;
            done.patched += 1;
        }
        Ok(done)
    }

    /// Bytes held by kept originals (0 when the tensors came through [`Self::recorder`]).
    pub fn kept_bytes(&self) -> u64 {
        lock(&self.touched)
            .values()
            .filter_map(|e| e.kept.as_ref())
            .map(|k| (k.elem_count() * k.dtype().size_in_bytes()) as u64)
            .sum()
    }
}

/// A VarBuilder backend that serves `source`'s tensors and records each in `table`.
struct Recorder {
    source: VarBuilder<'static>,
    table: Arc<WeightTable>,
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        hints: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self
            .source
            .get_with_hints_dtype(s, name, hints, dtype)?
            .to_device(dev)?;
        self.table.record(name, &t);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .source
            .get_unchecked_dtype(name, dtype)?
            .to_device(dev)?;
        self.table.record(name, &t);
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_with(name: &str, t: &Tensor) -> Arc<WeightTable> {
        let table = WeightTable::new();
        table.record(name, t);
        table
    }

    #[test]
    fn merge_then_restore_is_exact() {
        let dev = Device::Cpu;
        let w0: Vec<f32> = (0..12).map(|i| i as f32 * 0.37 - 1.1).collect();
        let w = Tensor::from_vec(w0.clone(), (3, 4), &dev).unwrap();
        let table = table_with("a.weight", &w);
        let up = Tensor::from_vec(vec![1f32, 2., 3.], (3, 1), &dev).unwrap();
        let down = Tensor::from_vec(vec![0.5f32, -1., 0., 2.], (1, 4), &dev).unwrap();
        let delta = |id: &str, scale| Delta {
            id: id.into(),
            up: up.clone(),
            down: down.clone(),
            scale,
        };
        let mut want = HashMap::new();
        want.insert("a.weight".to_string(), vec![delta("x@1", 1.0)]);
        assert_eq!(table.apply(&want).unwrap().rewritten, 1);
        let got = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((got[0] - (w0[0] + 0.5)).abs() < 1e-6);
        assert!((got[11] - (w0[11] + 6.0)).abs() < 1e-6);
        // The same set again rewrites nothing.
        assert_eq!(table.apply(&want).unwrap().rewritten, 0);
        // Two terms add up, from the original.
        want.insert(
            "a.weight".to_string(),
            vec![delta("x@0.5", 0.5), delta("y@-1", -1.0)],
        );
        table.apply(&want).unwrap();
        let got = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((got[3] - (w0[3] + 2.0 * 0.5 - 2.0)).abs() < 1e-6);
        // Nothing wanted: the original, bit for bit.
        table.apply(&HashMap::new()).unwrap();
        let got = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, w0);
        assert_eq!(table.kept_bytes(), 0);
    }

    #[test]
    fn conv_terms_take_the_weight_shape() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((2, 3, 3, 3), DType::F32, &dev).unwrap();
        let table = table_with("c.weight", &w);
        let up = Tensor::ones((2, 1, 1, 1), DType::F32, &dev).unwrap();
        let down = Tensor::ones((1, 3, 3, 3), DType::F32, &dev).unwrap();
        let mut want = HashMap::new();
        want.insert(
            "c.weight".to_string(),
            vec![Delta {
                id: "c".into(),
                up,
                down,
                scale: 2.0,
            }],
        );
        table.apply(&want).unwrap();
        let s = w.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(s, 2.0 * 54.0);
    }
}
