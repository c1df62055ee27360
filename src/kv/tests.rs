use super::*;

fn layout() -> CacheLayout {
    CacheLayout {
        n_layers: 2,
        n_kv_heads: 3,
        head_dim: 4,
        dtype: KvDtype::F32,
        window: None,
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
    let HostKvMut::F16 { k: hk, .. } = hl.kv else {
        panic!("an f16 host layer");
    };
    // head 2, position 199, element 3
    let at = (2 * hl.capacity + 199) * 4 + 3;
    assert_eq!(hk[at].to_f32(), val(2 * 200 * 4 + 199 * 4 + 3));
    hk[(hl.capacity + 200) * 4] = half::f16::from_f32(-1.0);
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

/// A bf16 cache on the CPU lives in host vectors too: `write_layer` fills them, an
/// in-place write through the view shows in the export, and growth keeps both.
#[test]
fn bf16_host_cache_is_written_in_place() -> Result<()> {
    let dev = Device::Cpu;
    let lay = CacheLayout {
        dtype: KvDtype::BF16,
        ..layout()
    };
    let mut c = SeqCache::new(lay, &dev);
    assert!(c.is_host());
    c.reserve(10)?;
    // Integers below 256 are exact in bf16.
    let t = Tensor::from_vec((0..120).map(|i| i as f32).collect(), (1, 3, 10, 4), &dev)?;
    for l in 0..2 {
        c.write_layer(l, 0, &t, &t.neg()?)?;
    }
    c.commit(&[7; 10]);
    let hl = c.host_layer(0).unwrap();
    let HostKvMut::BF16 { k: hk, v: hv } = hl.kv else {
        panic!("a bf16 host layer");
    };
    // head 1, position 9, element 2
    let at = (hl.capacity + 9) * 4 + 2;
    assert_eq!((hk[at].to_f32(), hv[at].to_f32()), (78.0, -78.0));
    hk[(2 * hl.capacity + 10) * 4] = half::bf16::from_f32(0.5);
    c.commit(&[8]);
    c.reserve(GROW_TOKENS)?;
    assert_eq!(c.allocated_bytes(), c.tensor_bytes());
    let (k, _) = &c.export_layers()?[0];
    assert_eq!((k.dims(), k.dtype()), (&[1, 3, 11, 4][..], DType::BF16));
    let k: Vec<f32> = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    assert_eq!(k[(11 + 9) * 4 + 2], 78.0);
    assert_eq!(k[(2 * 11 + 10) * 4], 0.5);
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
        window: None,
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

/// Three layers, the middle one local with an 8-token window.
fn windowed(dtype: KvDtype) -> CacheLayout {
    CacheLayout {
        n_layers: 3,
        n_kv_heads: 2,
        head_dim: 32,
        dtype,
        window: LocalWindow::new(8, &[false, true, false]),
    }
}

/// Write `n` positions whose K values are their position (V: minus it) into every layer.
fn fill_positions(c: &mut SeqCache, n: usize) -> Result<()> {
    let dev = Device::Cpu;
    let pos = c.len();
    c.reserve(n)?;
    let t = Tensor::arange(pos as f32, (pos + n) as f32, &dev)?
        .reshape((1, 1, n, 1))?
        .broadcast_as((1, 2, n, 32))?
        .contiguous()?;
    for l in 0..3 {
        let (k, _) = c.write_layer(l, pos, &t, &t.neg()?)?;
        let first = if l == 1 { c.local_base() } else { 0 };
        assert_eq!(k.dim(2)?, pos + n - first, "view of layer {l}");
    }
    c.commit(&vec![7; n]);
    Ok(())
}

/// Position held in slot `j` of head 0 of each layer's export.
fn held_positions(c: &SeqCache) -> Result<Vec<Vec<f32>>> {
    c.export_layers()?
        .iter()
        .map(|(k, _)| {
            k.to_dtype(DType::F32)?
                .narrow(1, 0, 1)?
                .narrow(3, 0, 1)?
                .flatten_all()?
                .to_vec1()
        })
        .collect()
}

#[test]
fn local_layers_keep_their_window_not_the_whole_context() -> Result<()> {
    let dev = Device::Cpu;
    for d in KvDtype::ALL {
        let lay = windowed(d);
        let span = lay.window.map(|w| w.span(512)).unwrap_or(0);
        let mut c = SeqCache::new(lay, &dev);
        let chunks = [100, 1, 1, 37, 1, 512, 1, 1, 200, 3];
        let mut i = 0;
        while c.len() < 1600 {
            fill_positions(&mut c, chunks[i % chunks.len()])?;
            i += 1;
            let (len, base) = (c.len(), c.local_base());
            assert_eq!(c.allocated_bytes(), c.tensor_bytes(), "{d} at {len}");
            assert!(
                base + 8 <= len + 1 || base == 0,
                "{d}: base {base} at {len}"
            );
            assert!(c.can_resume_at(len), "{d} at {len}");
            let held = held_positions(&c)?;
            assert_eq!(held[0].len(), len);
            assert_eq!(held[1].len(), len - base);
            // Q8_0 stores 8-bit values: within one step of 1/127 of the block's range;
            // bf16 keeps 8 significant bits.
            let tol = match d {
                KvDtype::Q8_0 => len as f32 / 100.0,
                KvDtype::BF16 => len as f32 / 256.0,
                _ => 0.0,
            };
            for (l, first) in [(0, 0), (1, base), (2, 0)] {
                for (j, &p) in held[l].iter().enumerate() {
                    assert!(
                        (p - (first + j) as f32).abs() <= tol,
                        "{d} layer {l} slot {j}: {p}"
                    );
                }
            }
            // The local layer never holds more than its span for the largest chunk.
            assert!(c.allocated_bytes() <= lay.layer_bytes_per_token() * (2 * c.capacity() + span));
        }
        // Between requests, what a long chunk grew is given back.
        fill_positions(&mut c, 512)?;
        let before = c.allocated_bytes();
        c.settle()?;
        let span1 = lay.window.map(|w| w.span(1)).unwrap_or(0);
        assert_eq!(
            c.allocated_bytes(),
            lay.layer_bytes_per_token() * (2 * c.capacity() + span1),
            "{d}: settled from {before}"
        );
        assert!(c.allocated_bytes() < before);
        assert_eq!(c.allocated_bytes(), c.tensor_bytes());
        let base = c.local_base();
        assert!(base > 1000, "{d}: local layer still holds from {base}");
        // Far below a cache that keeps every position in every layer.
        let whole = CacheLayout {
            window: None,
            ..lay
        };
        assert!(
            c.allocated_bytes() < whole.bytes_for(c.len()) * 5 / 6,
            "{d}"
        );
        assert_eq!(
            c.used_bytes(),
            lay.layer_bytes_per_token() * (2 * c.len() + c.len() - base)
        );

        // Spill form: the local layer's tensors hold its positions only, and come back.
        let map: std::collections::HashMap<_, _> = c.export_tensors()?.into_iter().collect();
        assert_eq!(map["k.1"].dim(2)?, c.len() - base);
        let back = SeqCache::from_tensors(lay, &dev, c.tokens().to_vec(), |n| map.get(n))?;
        assert_eq!(back.local_base(), base);
        assert_eq!(held_positions(&back)?, held_positions(&c)?, "{d}");
        let mut back = back;
        fill_positions(&mut back, 300)?;
        assert_eq!(back.allocated_bytes(), back.tensor_bytes());

        // A short rewind keeps the cache; one past what the window still holds clears it.
        let len = c.len();
        assert!(c.can_resume_at(len - 100));
        assert!(!c.can_resume_at(base));
        c.truncate(len - 100);
        assert_eq!(c.len(), len - 100);
        fill_positions(&mut c, 5)?;
        let last = held_positions(&c)?[1].last().copied().unwrap_or(0.0);
        // (f16 holds integers exactly up to 2048, then in steps of 2; bf16 up to 256,
        // then in steps of 2^(e - 7).)
        let tol = match d {
            KvDtype::Q8_0 => len as f32 / 100.0,
            KvDtype::F16 => 1.0,
            KvDtype::BF16 => len as f32 / 256.0,
            _ => 0.0,
        };
        assert!((last - (len - 96) as f32).abs() <= tol, "{d}: {last}");
        c.truncate(base + 3);
        assert_eq!(
            (c.len(), c.local_base()),
            (0, 0),
            "{d}: a rewind too far clears"
        );
        fill_positions(&mut c, 20)?;
        assert_eq!(held_positions(&c)?[1].len(), 20);
    }
    Ok(())
}

#[test]
fn bytes_for_caps_local_layers() {
    let lay = windowed(KvDtype::F16);
    let per_layer = lay.layer_bytes_per_token();
    assert_eq!(lay.bytes_for(10), 3 * GROW_TOKENS * per_layer);
    let span = lay.window.map(|w| w.span(1)).unwrap_or(0);
    assert_eq!(lay.bytes_for(10_000), per_layer * (2 * 10_240 + span));
}
