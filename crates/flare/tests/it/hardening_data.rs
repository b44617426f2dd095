//! No data loss, no silent garbage (issue 10, items 1-5, 16, 17, 20): merge never writes into
//! its inputs or mixes with other files; a checkpoint is resumed only by its own run; the final
//! adapter is one directory; non-finite values stop the run and are never saved; a failing run
//! touches no output; a finished run is neither extended with a jumping schedule nor evaluated
//! twice; checkpoints rotate and a crash's leftovers are cleaned. All on the tiny qwen2 fixture,
//! on the CPU.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flare::io::Leftover;
use flare::train::{Event, Schedule, TrainConfig, Trainer};
use flare::Error;

use crate::common::Result;
use crate::train::{fixture, losses, memorise_data, scratch, small_config};

/// A copy of the fixture model (weights, config, tokenizer, and its PEFT adapter in
/// `adapter/`) under `dir`, so that a test may try to damage it.
fn model_copy(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(m.join("adapter")).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture().join(f), m.join(f)).unwrap();
    }
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture().join("adapter").join(f), m.join("adapter").join(f)).unwrap();
    }
    m
}

/// The entries of `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn metrics_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

// ---- 1. merge ---------------------------------------------------------------------------------

#[test]
fn merge_never_writes_into_its_inputs_or_mixes_with_other_files() -> Result<()> {
    let dir = scratch("h-merge");
    let model = model_copy(&dir);
    let adapter = model.join("adapter");
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    let merge = |out: &Path, force: bool| {
        flare::train::merge_adapter_to_dir(&model, &adapter, out, None, force)
    };
    // The base model's own directory, also spelt another way, and a directory that contains
    // it: refused even with force, and the model is untouched.
    for (out, what) in [
        (model.clone(), "is the base model"),
        (adapter.join(".."), "is the base model"),
        (dir.clone(), "contains the base model"),
        (adapter.clone(), "is the adapter"),
    ] {
        for force in [false, true] {
            let e = merge(&out, force).unwrap_err().to_string();
            assert!(e.contains(what), "{}: {e}", out.display());
        }
    }
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        weights
    );
    assert_eq!(
        names(&model),
        [
            "adapter",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );

    // A non-empty directory: refused, left as it was; with force, replaced whole.
    let busy = dir.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), b"mine").unwrap();
    let e = merge(&busy, false).unwrap_err().to_string();
    assert!(e.contains("not empty (notes.txt)"), "{e}");
    assert_eq!(names(&busy), ["notes.txt"]);
    merge(&busy, true)?;
    assert_eq!(
        names(&busy),
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    // A new directory (with missing parents) and an empty one are fine; nothing temporary is
    // left beside them.
    merge(&dir.join("new/merged"), false)?;
    assert_eq!(names(&dir.join("new")), ["merged"]);
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    merge(&empty, false)?;
    assert!(empty.join("model.safetensors").is_file());
    assert_eq!(names(&dir), ["busy", "empty", "model", "new"]);
    // What merge wrote loads.
    flare::models::Transformer::from_dir(&empty, DType::F32, &Device::Cpu)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A sharded base model (two shards named by `model.safetensors.index.json`, beside a stray
/// `consolidated.safetensors` that is not part of it, as Mistral's repositories have) merges
/// into the same two shards and a new index: every tensor equal to the one-file model's merge,
/// the stray file neither read nor written, one progress report per shard with its counts.
#[test]
fn merge_keeps_a_sharded_models_shards() -> Result<()> {
    use std::collections::HashMap;
    let dir = scratch("h-merge-shards");
    let model = model_copy(&dir);
    let adapter = model.join("adapter");
    let sharded = dir.join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    let all = candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu)?;
    let mut keys: Vec<&String> = all.keys().collect();
    keys.sort();
    let files = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = serde_json::Map::new();
    for (part, file) in keys.chunks(keys.len().div_ceil(2)).zip(files) {
        let shard: HashMap<String, Tensor> =
            part.iter().map(|&k| (k.clone(), all[k].clone())).collect();
        candle_core::safetensors::save(&shard, sharded.join(file))?;
        for k in part {
            weight_map.insert((*k).clone(), file.into());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
    let stray = HashMap::from([(
        "layers.0.attention.wq.weight".to_string(),
        Tensor::ones((2, 2), DType::F32, &Device::Cpu)?,
    )]);
    candle_core::safetensors::save(&stray, sharded.join("consolidated.safetensors"))?;
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model.join(f), sharded.join(f)).unwrap();
    }

    let one = dir.join("one");
    flare::train::merge_adapter_to_dir(&model, &adapter, &one, None, false)?;
    let out = dir.join("out");
    let mut reports = Vec::new();
    flare::train::merge_adapter_to_dir_with(&sharded, &adapter, &out, None, false, |p| {
        reports.push(p.clone())
    })?;
    assert_eq!(
        names(&out),
        [
            "config.json",
            files[0],
            files[1],
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    #[cfg(unix)]
    {
        // The shards are as readable as the rest (the safetensors writer makes its files 0600).
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode();
        assert_eq!(mode(files[0]), mode("config.json"));
        assert_eq!(mode(files[1]), mode("config.json"));
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    assert_eq!(index["weight_map"], serde_json::Value::Object(weight_map));

    // The same tensors as the one-file merge, bit for bit (bf16 to f32 is exact), and the
    // adapter changed some of them.
    let want = candle_core::safetensors::load(one.join("model.safetensors"), &Device::Cpu)?;
    let mut got = HashMap::new();
    let mut data_bytes = 0;
    for (i, file) in files.iter().enumerate() {
        let shard = candle_core::safetensors::load(out.join(file), &Device::Cpu)?;
        let bytes: usize = shard
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let r = &reports[i];
        assert_eq!(
            (r.file.as_str(), r.index, r.files, r.tensors, r.bytes),
            (*file, i + 1, 2, shard.len(), bytes as u64),
            "{r:?}"
        );
        data_bytes += bytes;
        got.extend(shard);
    }
    assert_eq!(reports.len(), 2);
    assert_eq!(index["metadata"]["total_size"], data_bytes as u64);
    let adapted = reports.iter().map(|r| r.merged).sum::<usize>();
    assert_eq!(
        adapted,
        flare::lora::load_adapter(&adapter, &Device::Cpu)?
            .tensors
            .len()
    );
    assert_eq!(got.len(), want.len());
    let mut changed = 0;
    for (k, w) in &want {
        let g = got
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing from the shards"));
        assert_eq!((g.dtype(), g.dims()), (w.dtype(), w.dims()), "{k}");
        let (g, w) = (g.to_dtype(DType::F32)?, w.to_dtype(DType::F32)?);
        assert_eq!(
            g.flatten_all()?.to_vec1::<f32>()?,
            w.flatten_all()?.to_vec1::<f32>()?,
            "{k}"
        );
        let base = all[k].to_dtype(DType::F32)?;
        if (w - base)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.0 {
            changed += 1;
        }
    }
    assert!(
        changed >= adapted / 2,
        "the adapter changed {changed} of {adapted} weights"
    );
    // The merged shards load as a model.
    flare::models::Transformer::from_dir(&out, DType::F32, &Device::Cpu)?;

    // An index naming a shard outside the model directory is refused, and nothing is written.
    let index =
        serde_json::json!({ "weight_map": { "model.embed_tokens.weight": "../x.safetensors" } });
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::copy(sharded.join(files[0]), dir.join("x.safetensors")).unwrap();
    let e = flare::train::merge_adapter_to_dir(&sharded, &adapter, dir.join("bad"), None, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.safetensors"), "{e}");
    assert!(!dir.join("bad").exists());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---- 2. resume belongs to its run -------------------------------------------------------------

#[test]
fn resume_refuses_a_checkpoint_of_another_run_naming_each_field() -> Result<()> {
    let dir = scratch("h-identity");
    let data = memorise_data(&dir);
    let mut cfg = small_config(&dir, data.clone(), 4);
    cfg.save_every = 2;
    let out = Trainer::from_config(cfg.clone(), &Device::Cpu)?.run(|_| {})?;
    let adapter_bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let metrics = std::fs::read(cfg.output_dir.join("metrics.jsonl")).unwrap();
    let ckpt = Trainer::latest_checkpoint(&cfg.output_dir).unwrap();
    assert!(ckpt.ends_with("checkpoint-4"));

    // Another lr and length: refused before anything is loaded, with both fields named.
    let mut other = cfg.clone();
    other.lr = 1e-3;
    other.max_steps = Some(6);
    let e = Trainer::resume_from_config(other.clone(), &Device::Cpu, &ckpt).unwrap_err();
    let Error::RunMismatch { differences, .. } = &e else {
        panic!("expected RunMismatch, got {e}");
    };
    assert_eq!(differences.len(), 2, "{differences:?}");
    assert!(differences[0].starts_with("`lr`: 0.001 here, 0.02 in the checkpoint"));
    assert!(differences[1].starts_with("`max_steps`: 6 steps here, 4 steps in the checkpoint"));
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        adapter_bytes,
        "the adapter was rewritten"
    );
    assert_eq!(
        std::fs::read(cfg.output_dir.join("metrics.jsonl")).unwrap(),
        metrics,
        "a refused resume touched metrics.jsonl"
    );

    // The data is compared by content: edited in place is another run ...
    let text = std::fs::read_to_string(&data).unwrap();
    std::fs::write(&data, text.replace("Paris", "Lyon")).unwrap();
    let e = Trainer::resume_from_config(cfg.clone(), &Device::Cpu, &ckpt)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`data`"), "{e}");
    // ... the same bytes at another path are the same run.
    std::fs::write(&data, &text).unwrap();
    let moved = dir.join("moved.jsonl");
    std::fs::copy(&data, &moved).unwrap();
    let mut same = cfg.clone();
    same.data = moved;
    let t = Trainer::resume_from_config(same.clone(), &Device::Cpu, &ckpt)?;
    assert_eq!(t.state().step, 4);
    drop(t);

    // A fresh run into the directory is refused, saying whose checkpoints it holds.
    let e = Trainer::from_config(other.clone(), &Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::OutputDirInUse { .. }), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("2 checkpoints, checkpoint-2 to checkpoint-4"),
        "{e}"
    );
    assert!(e.contains("of another run (`lr`"), "{e}");
    let e = Trainer::from_config(same, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is of this very run"), "{e}");
    assert!(e.contains("--resume"), "{e}");

    // Resuming this run into a directory that holds another run's checkpoints is refused
    // too: its checkpoints would be rotated away.
    let mut elsewhere = other.clone();
    elsewhere.output_dir = dir.join("other-run");
    Trainer::from_config(elsewhere, &Device::Cpu)?.run(|_| {})?;
    let mut into_other = cfg.clone();
    into_other.output_dir = dir.join("other-run");
    let e = Trainer::resume_from_config(into_other, &Device::Cpu, &ckpt)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a checkpoint of another run (`lr`"), "{e}");
    assert_eq!(
        Trainer::latest_checkpoint(dir.join("other-run")),
        Some(dir.join("other-run/checkpoint-6"))
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---- 3. the final adapter is one directory ----------------------------------------------------

#[test]
fn final_adapter_is_written_and_replaced_as_one_directory() -> Result<()> {
    let dir = scratch("h-unit");
    let cfg = small_config(&dir, memorise_data(&dir), 3);
    let out = cfg.output_dir.clone();
    let mut t = Trainer::from_config(cfg, &Device::Cpu)?;
    t.step()?;
    let a = t.save_final()?;
    assert_eq!(a, out.join("adapter"));
    assert_eq!(
        names(&a),
        ["adapter_config.json", "adapter_model.safetensors"]
    );
    // Nothing of the adapter at the top level, where a second save would replace the two
    // files one after the other.
    assert!(!out.join("adapter_config.json").exists());
    assert!(!out.join("adapter_model.safetensors").exists());
    let first = std::fs::read(a.join("adapter_model.safetensors")).unwrap();
    // A second save replaces the directory whole: a file put into the old one goes with it.
    std::fs::write(a.join("stray"), b"x").unwrap();
    t.step()?;
    t.save_final()?;
    assert_eq!(
        names(&a),
        ["adapter_config.json", "adapter_model.safetensors"]
    );
    assert_ne!(
        std::fs::read(a.join("adapter_model.safetensors")).unwrap(),
        first
    );
    // The training output directory loads as its adapter.
    let loaded = flare::lora::load_adapter(&out, &Device::Cpu)?;
    assert_eq!(loaded.config.r, 4);
    assert!(
        names(&out).iter().all(|n| !n.starts_with('.')),
        "{:?}",
        names(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---- 4. NaN / Inf -----------------------------------------------------------------------------

/// The fixture model with every weight NaN.
fn nan_model(dir: &Path) -> PathBuf {
    let m = model_copy(dir);
    let w = candle_core::safetensors::load(m.join("model.safetensors"), &Device::Cpu).unwrap();
    let nan: std::collections::HashMap<String, Tensor> = w
        .into_iter()
        .map(|(k, t)| (k, t.affine(0.0, f64::NAN).unwrap()))
        .collect();
    candle_core::safetensors::save(&nan, m.join("model.safetensors")).unwrap();
    m
}

#[test]
fn a_nan_model_is_refused_before_any_output() -> Result<()> {
    let dir = scratch("h-nanmodel");
    let mut cfg = small_config(&dir, memorise_data(&dir), 4);
    cfg.model = nan_model(&dir);
    let e = Trainer::from_config(cfg.clone(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("non-finite logits"), "{e}");
    assert!(e.contains("NaN"), "{e}");
    assert!(!cfg.output_dir.exists(), "the output directory was created");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn a_non_finite_step_stops_the_run_and_nothing_non_finite_is_saved() -> Result<()> {
    let dir = scratch("h-nanstep");
    let cfg = small_config(&dir, memorise_data(&dir), 6);
    let out = cfg.output_dir.clone();
    let mut t = Trainer::from_config(cfg, &Device::Cpu)?;
    losses(&mut t, 2)?;
    let ckpt = t.save_checkpoint()?;
    let adapter = t.save_final()?;
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    let saved = (
        read(ckpt.join("adapter_model.safetensors")),
        read(ckpt.join("optimizer.safetensors")),
        read(adapter.join("adapter_model.safetensors")),
    );
    let state = t.state().clone();
    // The adapter diverges (what a too-high learning rate does): B full of NaN.
    let weights = t.adapter()?;
    for (path, (a, b)) in &weights.tensors {
        let nan_b = b.affine(0.0, f64::NAN)?;
        t.model_mut()
            .lora_module_mut(path)
            .unwrap()
            .set_adapter_weights(flare::train::trainer::ADAPTER_NAME, a, &nan_b)?;
    }
    let e = t.step().unwrap_err();
    assert!(
        matches!(e, Error::NonFinite { step: 3, loss, .. } if loss.is_nan()),
        "{e}"
    );
    assert!(e.to_string().contains("training stopped"), "{e}");
    // The trainer is where the last good step left it: same step, same data position.
    assert_eq!(t.state(), &state);
    // Neither a checkpoint nor an adapter with NaN is written.
    for e in [
        t.save_checkpoint().unwrap_err(),
        t.save_final().map(|_| ()).unwrap_err(),
    ] {
        assert!(e.to_string().contains("non-finite"), "{e}");
    }
    assert_eq!(
        (
            read(ckpt.join("adapter_model.safetensors")),
            read(ckpt.join("optimizer.safetensors")),
            read(adapter.join("adapter_model.safetensors")),
        ),
        saved
    );
    assert_eq!(
        names(&out)
            .iter()
            .filter(|n| n.starts_with("checkpoint-"))
            .count(),
        1
    );
    // run() stops with the same error.
    let e = t.run(|_| {}).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---- 5. validation before output; metrics are appended ----------------------------------------

#[test]
fn a_run_that_fails_validation_touches_no_output() -> Result<()> {
    let dir = scratch("h-validate");
    let data = memorise_data(&dir);
    // A model config the RMSNorm op refuses, but that parses.
    let bad = model_copy(&dir);
    let text = std::fs::read_to_string(bad.join("config.json")).unwrap();
    std::fs::write(
        bad.join("config.json"),
        text.replace("\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": -1"),
    )
    .unwrap();
    let mut cfg = small_config(&dir, data, 2);
    cfg.model = bad.clone();
    let e = Trainer::from_config(cfg.clone(), &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("eps"), "{e}");
    assert!(!cfg.output_dir.exists(), "the output directory was created");

    // The same over a finished run's directory: its metrics.jsonl is kept byte for byte.
    let mut good = cfg.clone();
    good.model = fixture();
    Trainer::from_config(good.clone(), &Device::Cpu)?.run(|_| {})?;
    let metrics = std::fs::read(cfg.output_dir.join("metrics.jsonl")).unwrap();
    assert!(!metrics.is_empty());
    assert!(Trainer::from_config(cfg.clone(), &Device::Cpu).is_err());
    let mut bad_data = good.clone();
    bad_data.data = dir.join("missing.jsonl");
    assert!(Trainer::from_config(bad_data, &Device::Cpu).is_err());
    assert_eq!(
        std::fs::read(cfg.output_dir.join("metrics.jsonl")).unwrap(),
        metrics
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---- 16. a finished run is not extended with a jumping schedule -------------------------------

#[test]
fn resume_with_more_steps_is_refused_for_a_decaying_schedule_and_exact_for_a_constant_one(
) -> Result<()> {
    let dir = scratch("h-extend");
    let data = memorise_data(&dir);
    let mut cfg = small_config(&dir, data, 4);
    cfg.save_every = 4;
    Trainer::from_config(cfg.clone(), &Device::Cpu)?.run(|_| {})?;
    let ckpt = Trainer::latest_checkpoint(&cfg.output_dir).unwrap();
    let mut longer = cfg.clone();
    longer.max_steps = Some(6);
    let e = Trainer::resume_from_config(longer, &Device::Cpu, &ckpt)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`max_steps`: 6 steps here, 4 steps"), "{e}");
    assert!(e.contains("schedule spans the whole run"), "{e}");

    // Constant schedule: 4 steps, then extended to 6, give the losses and learning rates of
    // an uninterrupted 6-step run, bit for bit.
    let mut c = cfg.clone();
    c.schedule = Schedule::Constant;
    c.output_dir = dir.join("constant");
    let mut full = c.clone();
    full.max_steps = Some(6);
    full.output_dir = dir.join("constant-full");
    let mut want = Vec::new();
    Trainer::from_config(full, &Device::Cpu)?.run(|e| {
        if let Event::Step(m) = e {
            want.push((m.loss, m.lr));
        }
    })?;
    let mut got = Vec::new();
    Trainer::from_config(c.clone(), &Device::Cpu)?.run(|e| {
        if let Event::Step(m) = e {
            got.push((m.loss, m.lr));
        }
    })?;
    let ckpt = Trainer::latest_checkpoint(&c.output_dir).unwrap();
    c.max_steps = Some(6);
    let mut t = Trainer::resume_from_config(c.clone(), &Device::Cpu, &ckpt)?;
    assert_eq!((t.state().step, t.state().total_steps), (4, 6));
    t.run(|e| {
        if let Event::Step(m) = e {
            got.push((m.loss, m.lr));
        }
    })?;
    assert_eq!(got, want);
    // Shorter than the checkpoint's step: refused.
    c.max_steps = Some(3);
    let e = Trainer::resume_from_config(c, &Device::Cpu, &ckpt)
        .unwrap_err()
        .to_string();
    assert!(e.contains("past this run's 3 steps"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---- 17. no duplicate eval --------------------------------------------------------------------

#[test]
fn resuming_a_finished_run_logs_no_second_eval() -> Result<()> {
    let dir = scratch("h-eval");
    let mut cfg = small_config(&dir, memorise_data(&dir), 4);
    cfg.eval_fraction = 0.25;
    cfg.save_every = 4;
    let mut t = Trainer::from_config(cfg.clone(), &Device::Cpu)?;
    t.run(|_| {})?;
    // What the demo does: one more evaluate() after run(): the same loss, not logged twice.
    let again = t.evaluate()?.unwrap();
    drop(t);
    let evals_at_4 = |out: &Path| {
        metrics_lines(out)
            .iter()
            .filter(|v| v["step"] == 4 && v.get("eval_loss").is_some())
            .count()
    };
    assert_eq!(evals_at_4(&cfg.output_dir), 1);
    let logged = metrics_lines(&cfg.output_dir)
        .iter()
        .find_map(|v| v["eval_loss"].as_f64())
        .unwrap();
    assert_eq!(logged, again);

    // Resuming from the final checkpoint: no step, no new eval line; the logged eval is
    // reported, and the final adapter is written again.
    let ckpt = Trainer::latest_checkpoint(&cfg.output_dir).unwrap();
    assert!(ckpt.ends_with("checkpoint-4"));
    std::fs::remove_dir_all(cfg.output_dir.join("adapter")).unwrap();
    let mut t = Trainer::resume_from_config(cfg.clone(), &Device::Cpu, &ckpt)?;
    let mut events = Vec::new();
    t.run(|e| events.push(e.clone()))?;
    assert!(matches!(
        events.as_slice(),
        [Event::Eval { step: 4, loss }, Event::Done { .. }] if *loss == logged
    ));
    assert_eq!(evals_at_4(&cfg.output_dir), 1);
    assert!(cfg
        .output_dir
        .join("adapter/adapter_model.safetensors")
        .is_file());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---- 20. rotation and leftovers ---------------------------------------------------------------

#[test]
fn checkpoints_rotate_and_a_crash_s_leftovers_are_cleaned() -> Result<()> {
    let dir = scratch("h-rotate");
    let mut cfg = small_config(&dir, memorise_data(&dir), 5);
    cfg.save_every = 1;
    cfg.save_total_limit = 2;
    let out = cfg.output_dir.clone();
    // What killed runs leave: temporary files of atomic writes, temporary checkpoint and
    // adapter directories (pid 4000000000: no process can have it).
    let dead = 4_000_000_000u32;
    std::fs::create_dir_all(out.join("token-cache")).unwrap();
    let left = [
        out.join(format!(".tmp-checkpoint-3-{dead}")),
        out.join(format!(".checkpoint-2.tmp.{dead}.0")),
        out.join(format!(".adapter.tmp.{dead}.1")),
    ];
    for d in &left {
        std::fs::create_dir_all(d.join("partial")).unwrap();
    }
    let files = [
        out.join(format!(".loss.png.tmp.{dead}.2")),
        out.join(format!("token-cache/.mem-0.tokens.json.tmp.{dead}.3")),
    ];
    for f in &files {
        std::fs::write(f, b"half").unwrap();
    }
    let mut t = Trainer::from_config(cfg.clone(), &Device::Cpu)?;
    let mut removed: Vec<PathBuf> = t
        .leftovers()
        .iter()
        .map(|l| match l {
            Leftover::Removed(p) => p.clone(),
            other => panic!("unexpected {other}"),
        })
        .collect();
    removed.sort();
    let mut want: Vec<PathBuf> = left.iter().chain(&files).cloned().collect();
    want.sort();
    assert_eq!(removed, want);
    assert!(want.iter().all(|p| !p.exists()));
    let mut saved = Vec::new();
    t.run(|e| {
        if let Event::Checkpoint { step, .. } = e {
            saved.push(*step);
        }
    })?;
    assert_eq!(saved, [1, 2, 3, 4, 5]);
    assert_eq!(
        names(&out),
        [
            "adapter",
            "checkpoint-4",
            "checkpoint-5",
            "loss.png",
            "metrics.jsonl",
            "token-cache"
        ]
    );
    // 0 keeps every checkpoint.
    let mut all = cfg.clone();
    all.save_total_limit = 0;
    all.output_dir = dir.join("all");
    Trainer::from_config(all.clone(), &Device::Cpu)?.run(|_| {})?;
    let n = names(&all.output_dir)
        .iter()
        .filter(|n| n.starts_with("checkpoint-"))
        .count();
    assert_eq!(n, 5);
    assert_eq!(TrainConfig::default().save_total_limit, 3);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
