//! The prompts shipped in `media/` decode to 8 kHz speech, and names outside it are refused.

use callforge::media::PromptCache;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn every_shipped_prompt_decodes_to_speech() {
    let cache = PromptCache::new(format!("{ROOT}/media"), 16 * 1024 * 1024);
    let mut seen = 0;
    for entry in std::fs::read_dir(format!("{ROOT}/media/ivr")).unwrap() {
        let name = format!("ivr/{}", entry.unwrap().file_name().to_string_lossy());
        let samples = cache.load(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let seconds = samples.len() as f64 / 8000.0;
        assert!((0.5..15.0).contains(&seconds), "{name}: {seconds} s");
        let rms = (samples.iter().map(|&s| (s as f64).powi(2)).sum::<f64>() / samples.len() as f64)
            .sqrt();
        assert!(rms > 300.0, "{name} is speech, not silence (rms {rms})");
        seen += 1;
    }
    assert!(seen >= 8, "the IVR prompts are shipped");
    for bad in ["../Cargo.toml", "/etc/passwd", "ivr/../../Cargo.toml"] {
        assert!(cache.load(bad).is_err(), "{bad} must be refused");
    }
}
