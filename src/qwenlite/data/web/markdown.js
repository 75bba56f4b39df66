"use strict";
// Answers as Markdown, by the vendored libraries: marked parses (GFM: tables, task lists), KaTeX writes math as
// MathML (the browser draws it: no fonts to ship), DOMPurify removes whatever could run script or load from
// elsewhere, highlight.js colours code. A model's output is untrusted text: nothing reaches the page unsanitised.
// Rendering is incremental: one element per top-level block, kept while its source is unchanged, so a streaming
// answer costs a lex of the text and a render of its last block per frame.
const Markdown = (() => {
  const katexOptions = { output: "mathml", throwOnError: false };

  // LaTeX's \( \) and \[ \] delimiters, which Qwen models write as often as $ and $$ (markedKatex reads only dollars).
  const bracketMath = {
    name: "bracketMath",
    level: "inline",
    start(src) {
      const i = src.search(/\\[([]/);
      return i < 0 ? undefined : i;
    },
    tokenizer(src) {
      const m = /^\\\(([\s\S]+?)\\\)|^\\\[([\s\S]+?)\\\]/.exec(src);
      if (m) return { type: "bracketMath", raw: m[0], text: (m[1] ?? m[2]).trim(), display: m[2] !== undefined };
    },
    renderer(token) {
      return katex.renderToString(token.text, { ...katexOptions, displayMode: token.display });
    },
  };
  const md = new marked.Marked({ gfm: true }, markedKatex(katexOptions), { extensions: [bracketMath] });

  // KaTeX's <annotation> holds the TeX source, which DOMPurify unwraps (it refuses the element) into visible text.
  // Inline styles could lay a fake page over the real one.
  const purifyOptions = { ADD_FORBID_CONTENTS: ["annotation"], FORBID_TAGS: ["style"], FORBID_ATTR: ["style"] };
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
    // Only images carried in the answer itself load: a URL to elsewhere could carry the conversation out in its query.
    if (node.tagName === "IMG" && !/^data:image\//i.test(node.getAttribute("src") || "")) node.removeAttribute("src");
  });
  hljs.configure({ ignoreUnescapedHTML: true });

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    // Plain http on another host than localhost has no Clipboard API: the old way still works there.
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }

  // Code blocks: highlighted (a language highlight.js lacks stays plain), with a button that copies the code.
  function decorate(block) {
    for (const code of block.querySelectorAll("pre > code")) {
      const lang = (/\blanguage-(\S+)/.exec(code.className) || [])[1];
      if (!lang || hljs.getLanguage(lang)) hljs.highlightElement(code);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "copy";
      button.textContent = "Copy";
      button.addEventListener("click", async () => {
        await copyText(code.textContent);
        button.textContent = "Copied";
        setTimeout(() => (button.textContent = "Copy"), 1500);
      });
      code.parentElement.append(button);
    }
  }

  function renderBlock(token, links) {
    const tokens = [token];
    tokens.links = links;
    const block = document.createElement("div");
    block.className = "md-block";
    block.innerHTML = DOMPurify.sanitize(md.parser(tokens), purifyOptions);
    decorate(block);
    return block;
  }

  const rendered = new WeakMap(); // container -> [{key, block}], one per top-level token

  // Make `container` show `text` as Markdown, re-rendering only the blocks whose source changed.
  function render(container, text) {
    const tokens = md.lexer(text);
    // A reference link's definition can come after its use: a changed definition renders everything again.
    const salt = JSON.stringify(tokens.links);
    let kept = rendered.get(container);
    if (!kept) {
      container.replaceChildren();
      rendered.set(container, (kept = []));
    }
    let i = 0;
    while (i < tokens.length && i < kept.length && kept[i].key === salt + tokens[i].raw) i++;
    for (const { block } of kept.splice(i)) block.remove();
    for (; i < tokens.length; i++) {
      const block = renderBlock(tokens[i], tokens.links);
      container.append(block);
      kept.push({ key: salt + tokens[i].raw, block });
    }
  }

  return { render, copyText };
})();
