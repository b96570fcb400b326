// Parses PromQL expressions with the Prometheus project's lezer grammar
// (@prometheus-io/lezer-promql, the parser of Prometheus' own web UI) and
// reports, for each, the syntax errors and the names it uses, so
// scripts/chart-check/check.py can hold dashboards and alerts to the metrics
// the server exports.
//
//   node promql.cjs <dir with node_modules> < ["expr", ...] > [{...}, ...]
//
// Each result: {errors: [offset…], selectors: [{metric, labels: [...]}],
// grouping: [label…], unsupported: [text…]}.
'use strict';
const path = require('path');
const { createRequire } = require('module');

const requireFrom = createRequire(path.join(path.resolve(process.argv[2]), 'package.json'));
const { parser } = requireFrom('@prometheus-io/lezer-promql');

function analyse(expr) {
  const tree = parser.parse(expr);
  const text = (node) => expr.slice(node.from, node.to);
  const result = { errors: [], selectors: [], grouping: [], unsupported: [] };
  tree.iterate({
    enter(ref) {
      if (ref.type.isError) {
        result.errors.push(ref.from);
        return;
      }
      const node = ref.node;
      switch (ref.name) {
        case 'VectorSelector': {
          const id = node.getChild('Identifier');
          const labels = [];
          const matchers = node.getChild('LabelMatchers');
          if (matchers) {
            for (const child of matchers.getChildren('UnquotedLabelMatcher')) {
              labels.push(text(child.getChild('LabelName')));
            }
            for (const child of matchers.getChildren('QuotedLabelMatcher')) {
              result.unsupported.push(text(child));
            }
            for (const child of matchers.getChildren('QuotedLabelName')) {
              result.unsupported.push(text(child));
            }
          }
          result.selectors.push({ metric: id ? text(id) : null, labels });
          break;
        }
        case 'GroupingLabels':
          for (const child of node.getChildren('LabelName')) {
            result.grouping.push(text(child));
          }
          for (const child of node.getChildren('QuotedLabelName')) {
            result.unsupported.push(text(child));
          }
          break;
        default:
          break;
      }
    },
  });
  return result;
}

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const expressions = JSON.parse(input);
  process.stdout.write(JSON.stringify(expressions.map(analyse)));
});
