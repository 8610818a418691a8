"""The labeling page: the picks of a ``suggest`` CSV in the browser, labeled with the keyboard, saved atomically.

``visiontune label picks.csv`` serves this page on the loopback interface. It shows one pick at a time
(large) with the strip of all picks, the class list (from ``--labeled`` data or the run, kept in the CSV's
``.json``; new classes can be added on the page), and the keys: ``1``-``9`` choose a class, ``←``/``→`` move,
``s`` skips, ``u`` or ``Ctrl+Z`` undoes the last change, ``Ctrl+S`` saves. Every change is sent to the server,
which rewrites the CSV through :func:`visiontune.atomic.write_text_atomic` (a reader sees the old file or the new
one, never half of it). Only the images the CSV lists are served. Once every row has a label the CSV is a
manifest ``visiontune train data.dataset=picks.csv`` reads.

Written with FastAPI (the ``serve`` extra), imported when the page is served.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations (``fastapi.Request``, imported
# when the app is made) at definition time.
from pathlib import Path
from typing import Any

from visiontune.errors import DataError
from visiontune.suggest.output import read_picks, write_labels

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>visiontune: label the picks</title>
<style>
body{font-family:system-ui,sans-serif;margin:1rem;color:#222}
#main{display:flex;gap:1.5rem;align-items:flex-start}
#big{max-width:480px;max-height:480px;border:1px solid #ccc}
#classes button{display:block;margin:.2rem 0;padding:.3rem .8rem;min-width:12rem;text-align:left}
#classes button.on{background:#2a6;color:#fff}
#strip{display:flex;flex-wrap:wrap;gap:4px;margin-top:1rem}
#strip img{width:56px;height:56px;object-fit:cover;border:3px solid transparent;cursor:pointer}
#strip img.cur{border-color:#36c}#strip img.done{opacity:.45}
#status{margin:.5rem 0;font-weight:600}.keys{color:#666;font-size:.9rem}
</style></head><body>
<h1>Label the suggested images</h1>
<div id="status">loading...</div>
<div id="main"><div><img id="big" alt=""><div id="reason"></div><div id="where"></div></div>
<div><div id="classes"></div>
<input id="newclass" placeholder="new class name"><button id="add">add class</button>
<p class="keys">keys: 1-9 class, &larr;/&rarr; move, s skip, u or Ctrl+Z undo, Ctrl+S save</p>
<button id="undo">undo</button> <button id="save">save</button></div></div>
<div id="strip"></div>
<script>
let rows=[], classes=[], cur=0, history=[], dirty=false;
const $=id=>document.getElementById(id);
async function load(){
  const r=await fetch('api/picks'); const d=await r.json();
  rows=d.rows; classes=d.classes; cur=Math.max(0, rows.findIndex(r=>!r.label));
  render();
}
function labeled(){return rows.filter(r=>r.label).length}
function render(){
  const r=rows[cur];
  $('big').src='image/'+cur; $('reason').textContent=r.reason; $('where').textContent=r.path;
  $('status').textContent=`${cur+1} / ${rows.length}: ${r.label||'(no label)'} - ${labeled()} labeled`+(dirty?' (saving...)':' (saved)');
  $('status').dataset.labeled=labeled(); $('status').dataset.dirty=dirty;
  $('classes').innerHTML='';
  classes.forEach((c,i)=>{const b=document.createElement('button');b.textContent=(i<9?(i+1)+'  ':'')+c;
    b.dataset.cls=c; if(r.label===c)b.className='on'; b.onclick=()=>setLabel(c); $('classes').appendChild(b)});
  $('strip').innerHTML='';
  rows.forEach((x,i)=>{const im=document.createElement('img');im.src='image/'+i;im.title=x.label||x.reason;
    im.className=(i===cur?'cur ':'')+(x.label?'done':''); im.onclick=()=>{cur=i;render()}; $('strip').appendChild(im)});
}
async function save(){
  dirty=true; render();
  const labels={}; rows.forEach(r=>labels[r.path]=r.label||'');
  const res=await fetch('api/labels',{method:'POST',headers:{'content-type':'application/json'},body:JSON.stringify({labels})});
  if(!res.ok){$('status').textContent='save failed: '+(await res.text()); return}
  dirty=false; render();
}
function setLabel(c){
  history.push([cur, rows[cur].label]); rows[cur].label=c;
  const next=rows.findIndex((r,i)=>i>cur&&!r.label); if(next>=0)cur=next; save();
}
function undo(){ if(!history.length)return; const [i,old]=history.pop(); rows[i].label=old; cur=i; save(); }
function addClass(){const v=$('newclass').value.trim(); if(v&&!classes.includes(v)){classes.push(v);} $('newclass').value=''; render();}
$('undo').onclick=undo; $('save').onclick=save; $('add').onclick=addClass;
document.addEventListener('keydown',e=>{
  if(e.target.tagName==='INPUT'){ if(e.key==='Enter')addClass(); return; }
  if((e.ctrlKey||e.metaKey)&&e.key==='z'){e.preventDefault();undo();return}
  if((e.ctrlKey||e.metaKey)&&e.key==='s'){e.preventDefault();save();return}
  if(e.key>='1'&&e.key<='9'){const c=classes[+e.key-1]; if(c)setLabel(c)}
  else if(e.key==='ArrowRight'||e.key==='s'){cur=Math.min(rows.length-1,cur+1);render()}
  else if(e.key==='ArrowLeft'){cur=Math.max(0,cur-1);render()}
  else if(e.key==='u'){undo()}
});
load();
</script></body></html>
"""


def create_label_app(csv_path: str | Path) -> Any:
    """The FastAPI app of the labeling page for ``csv_path`` (a picks CSV written by ``suggest``).

    Raises:
        DataError: not a picks CSV.
    """
    import fastapi
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    path = Path(csv_path).resolve()
    rows, meta = read_picks(path)  # checks the header now, before the server starts
    del rows
    app = fastapi.FastAPI(title="visiontune labeling page", docs_url=None, redoc_url=None, openapi_url=None)

    def current() -> list[dict[str, str]]:
        return read_picks(path)[0]

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/api/picks")
    def picks() -> dict[str, Any]:
        rows = current()
        classes = list(meta.get("classes") or [])
        classes += sorted({r["label"] for r in rows if r["label"]} - set(classes))
        return {"rows": [{"path": r["path"], "label": r["label"], "reason": r["reason"]} for r in rows],
                "classes": classes}

    @app.get("/image/{index}")
    def image(index: int) -> Any:
        rows = current()
        if not 0 <= index < len(rows):
            raise fastapi.HTTPException(404, f"no pick {index}")
        p = Path(rows[index]["path"])
        return FileResponse(p if p.is_absolute() else path.parent / p)

    @app.post("/api/labels")
    async def labels(request: fastapi.Request) -> Any:
        body = await request.json()
        given = body.get("labels") if isinstance(body, dict) else None
        if not isinstance(given, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in given.items()):
            return JSONResponse({"error": 'send {"labels": {"<path>": "<label>", ...}}'}, status_code=422)
        try:
            n = write_labels(path, given)
        except DataError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        return {"labeled": n, "rows": len(given)}

    return app


def serve_labels(csv_path: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the labeling page until interrupted (Ctrl+C)."""
    import uvicorn

    app = create_label_app(csv_path)
    print(f"labeling page: http://{host}:{port}/  (Ctrl+C to stop; labels are saved as you go)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
