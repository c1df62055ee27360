use super::*;

fn layout() -> CacheLayout {
    CacheLayout {
        n_layers: 2,
        n_kv_heads: 3,
        head_dim: 4,
        dtype: KvDtype::F32,
    }
}

#[test]
fn grows_in_chunks_and_keeps_contents() -> Result<()> {
    let dev = Device::Cpu;
    let mut c = SeqCache::new(layout(), &dev);
    assert_eq!(c.allocated_bytes(), 0);
    let step = |c: &mut SeqCache, n: usize, val: f32| -> Result<()> {
        let pos = c.len();
        c.reserve(n)?;
        let t = Tensor::full(val, (1, 3, n, 4), &dev)?;
        for l in 0..2 {
            c.write_layer(l, pos, &t, &t)?;
        }
        c.commit(&vec![val as u32; n]);
        Ok(())
    };
    step(&mut c, 200, 1.0)?;
    assert_eq!(
        c.allocated_bytes(),
        GROW_TOKENS * layout().bytes_per_token()
    );
    step(&mut c, 100, 2.0)?;
    assert_eq!(c.len(), 300);
    assert_eq!(
        c.allocated_bytes(),
        2 * GROW_TOKENS * layout().bytes_per_token()
    );
    let (k, _) = {
        let t = Tensor::full(3f32, (1, 3, 1, 4), &dev)?;
        c.reserve(1)?;
        c.write_layer(1, 300, &t, &t)?
    };
    let vals: Vec<f32> = k.flatten_all()?.to_vec1()?;
    // position 0 still 1.0, position 250 is 2.0, last is 3.0
    let at = |p: usize| vals[p * 4];
    assert_eq!(at(0), 1.0);
    assert_eq!(at(250), 2.0);
    assert_eq!(at(300), 3.0);
    Ok(())
}

/// The host form (f16 on the CPU) keeps contents across growth, and its in-place
/// view, `write_layer` and `export_layers` agree on the layout.
#[test]
fn host_cache_grows_and_exports() -> Result<()> {
    let dev = Device::Cpu;
    let lay = CacheLayout {
        dtype: KvDtype::F16,
        ..layout()
    };
    let mut c = SeqCache::new(lay, &dev);
    assert!(c.is_host());
    c.reserve(200)?;
    // Integers below 2048 are exact in f16.
    let val = |i: usize| (i % 1500) as f32;
    let t = Tensor::from_vec((0..2400).map(val).collect(), (1, 3, 200, 4), &dev)?;
    for l in 0..2 {
        c.write_layer(l, 0, &t, &(&t * 2.0)?)?;
    }
    c.commit(&[7; 200]);
    c.reserve(100)?; // grows to 512: contents move to the wider layout
    assert_eq!(c.allocated_bytes(), 2 * GROW_TOKENS * lay.bytes_per_token());
    let hl = c.host_layer(1).unwrap();
    assert_eq!(hl.capacity, 2 * GROW_TOKENS);
    // head 2, position 199, element 3
    let at = (2 * hl.capacity + 199) * 4 + 3;
    assert_eq!(hl.k[at].to_f32(), val(2 * 200 * 4 + 199 * 4 + 3));
    hl.k[(hl.capacity + 200) * 4] = half::f16::from_f32(-1.0);
    c.commit(&[8]);
    let (k, v) = &c.export_layers()?[1];
    assert_eq!(k.dims(), &[1, 3, 201, 4]);
    let k: Vec<f32> = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let v: Vec<f32> = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    assert_eq!(k[(201 + 200) * 4], -1.0);
    assert_eq!(k[(2 * 201 + 199) * 4 + 3], val(2 * 200 * 4 + 199 * 4 + 3));
    assert_eq!(
        v[(2 * 201 + 199) * 4 + 3],
        2.0 * val(2 * 200 * 4 + 199 * 4 + 3)
    );
    Ok(())
}

#[test]
fn prefix_and_truncate() {
    let mut c = SeqCache::new(layout(), &Device::Cpu);
    c.commit(&[1, 2, 3, 4]);
    assert_eq!(c.common_prefix(&[1, 2, 9]), 2);
    assert_eq!(c.common_prefix(&[1, 2, 3, 4, 5]), 4);
    c.truncate(2);
    assert_eq!(c.tokens(), &[1, 2]);
}

#[test]
fn overflow_is_an_error_not_a_panic() -> Result<()> {
    let dev = Device::Cpu;
    let mut c = SeqCache::new(layout(), &dev);
    c.reserve(1)?;
    let t = Tensor::zeros((1, 3, 2, 4), DType::F32, &dev)?;
    assert!(c.write_layer(0, GROW_TOKENS - 1, &t, &t).is_err());
    assert!(c.write_layer(5, 0, &t, &t).is_err());
    Ok(())
}

fn layout_of(dtype: KvDtype) -> CacheLayout {
    CacheLayout {
        n_layers: 2,
        n_kv_heads: 3,
        head_dim: 64,
        dtype,
    }
}

/// Write `n` positions of ramp values into every layer.
fn fill(c: &mut SeqCache, n: usize) -> Result<()> {
    let dev = Device::Cpu;
    let pos = c.len();
    c.reserve(n)?;
    for l in 0..c.layout().n_layers {
        let t = (Tensor::arange(0f32, (3 * n * 64) as f32, &dev)?.reshape((1, 3, n, 64))?
            * (0.01 * (l + 1) as f64))?;
        c.write_layer(l, pos, &t, &(&t * -0.5)?)?;
    }
    c.commit(&vec![1; n]);
    Ok(())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn accounted_bytes_are_the_real_tensor_bytes_for_every_dtype() -> Result<()> {
    // Per token: 2 (K, V) x 2 layers x 3 heads x 64 values.
    let per_token = |d: KvDtype| match d {
        KvDtype::F32 => 2 * 2 * 3 * 64 * 4,
        KvDtype::F16 | KvDtype::BF16 => 2 * 2 * 3 * 64 * 2,
        KvDtype::Q8_0 => 2 * 2 * 3 * (64 + 2 * 2),
    };
    for d in KvDtype::ALL {
        let l = layout_of(d);
        assert_eq!(l.bytes_per_token(), per_token(d), "{d}");
        let mut c = SeqCache::new(l, &Device::Cpu);
        fill(&mut c, 300)?;
        assert_eq!(c.allocated_bytes(), c.tensor_bytes(), "{d}");
        assert_eq!(c.allocated_bytes(), 2 * GROW_TOKENS * per_token(d), "{d}");
    }
    assert_eq!(
        layout_of(KvDtype::Q8_0).bytes_per_token() as f64
            / layout_of(KvDtype::F16).bytes_per_token() as f64,
        34.0 / 64.0
    );
    Ok(())
}

#[test]
fn every_dtype_holds_the_values_and_round_trips_through_its_tensors() -> Result<()> {
    let dev = Device::Cpu;
    // Two writes (the second at position 30), as prefill then more turns would.
    let mut reference = SeqCache::new(layout_of(KvDtype::F32), &dev);
    fill(&mut reference, 30)?;
    fill(&mut reference, 10)?;
    let want = reference.export_layers()?;
    for (d, tol) in [
        (KvDtype::F32, 0.0),
        (KvDtype::F16, 2e-3),
        (KvDtype::BF16, 2e-2),
        (KvDtype::Q8_0, 1e-2),
    ] {
        let mut c = SeqCache::new(layout_of(d), &dev);
        fill(&mut c, 30)?;
        fill(&mut c, 10)?;
        let got = c.export_layers()?;
        for ((k, v), (wk, wv)) in got.iter().zip(&want) {
            let scale = wk.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(k.dims(), &[1, 3, 40, 64]);
            assert!(max_diff(k, wk) <= tol * scale, "{d}: K differs");
            assert!(max_diff(v, wv) <= tol * scale, "{d}: V differs");
        }
        let named = c.export_tensors()?;
        let map: std::collections::HashMap<_, _> = named.into_iter().collect();
        let back = SeqCache::from_tensors(layout_of(d), &dev, c.tokens().to_vec(), |n| map.get(n))?;
        for ((k, v), (bk, bv)) in got.iter().zip(&back.export_layers()?) {
            assert_eq!(max_diff(k, bk), 0.0, "{d}: K changed in the round trip");
            assert_eq!(max_diff(v, bv), 0.0, "{d}: V changed in the round trip");
        }
        // Tensors of another dtype are refused, never reinterpreted.
        for other in KvDtype::ALL.into_iter().filter(|o| *o != d) {
            let r =
                SeqCache::from_tensors(layout_of(other), &dev, c.tokens().to_vec(), |n| map.get(n));
            assert!(r.is_err(), "{d} tensors accepted as {other}");
        }
    }
    Ok(())
}

#[test]
fn q8_0_refuses_a_head_dim_it_cannot_block() {
    let l = CacheLayout {
        head_dim: 4,
        ..layout_of(KvDtype::Q8_0)
    };
    assert!(l.check().is_err());
    assert!(SeqCache::new(l, &Device::Cpu).reserve(1).is_err());
}
