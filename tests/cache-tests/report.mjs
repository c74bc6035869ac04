// Summarises a cache-tests run of Skua beside the results the suite publishes for other
// caches: `node report.mjs SUITE_DIR NAME=RESULT.json...`.
import fs from 'fs'
import path from 'path'
import { pathToFileURL } from 'url'

const [suite, ...runs] = process.argv.slice(2)
const index = (await import(pathToFileURL(path.join(suite, 'tests/index.mjs')))).default
const published = (await import(pathToFileURL(path.join(suite, 'results/index.mjs')))).default
  .filter(r => r.type === 'rev-proxy' || r.type === 'cdn')
const load = f => JSON.parse(fs.readFileSync(f))
const columns = [
  ...runs.map(r => { const [name, file] = r.split('='); return { name, results: load(file) } }),
  ...published.map(p => ({ name: `${p.name} ${p.version || ''}`.trim(), results: load(path.join(suite, 'results', p.file)) }))
]
const kinds = ['required', 'optimal', 'check']
console.log('| cache | ' + kinds.map(k => `${k} passed`).join(' | ') + ' |')
console.log('|---|' + kinds.map(() => '---:|').join(''))
for (const c of columns) {
  const count = Object.fromEntries(kinds.map(k => [k, [0, 0]]))
  for (const s of index) {
    for (const t of s.tests) {
      const v = c.results[t.id]
      if (v === undefined) continue
      const k = t.kind || 'required'
      count[k][1]++
      if (v === true) count[k][0]++
    }
  }
  console.log(`| ${c.name} | ` + kinds.map(k => `${count[k][0]} of ${count[k][1]}`).join(' | ') + ' |')
}
for (const c of columns.slice(0, runs.length)) {
  console.log(`\n${c.name}: required and optimal tests not passed`)
  for (const s of index) {
    for (const t of s.tests) {
      const v = c.results[t.id]
      const k = t.kind || 'required'
      if (v === undefined || v === true || k === 'check') continue
      console.log(`- ${k} \`${t.id}\`: ${v[1]}`)
    }
  }
}
