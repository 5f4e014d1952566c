/* Optional compiled speed-up of the frame scanner's per-frame fast path.
 *
 * walk_frames(data, pos, stop, steps, fast) -> (pos, count)
 *
 * Does exactly what the pure-Python loop in frames.FrameScanner.receive_data
 * does, only without an interpreter round per frame: starting at `pos`, while
 * a header starts at or before `stop`, look up the frame's whole size by its
 * second byte in the 256-byte table `steps` (0: not a fast frame) and accept
 * its first byte by the 256-byte table `fast`; step over the frame. Returns
 * where it stopped and how many frames it stepped over. The last frame may run
 * past the end of `data`; the caller handles that, as it does for the Python
 * loop. wsgate works the same without this module.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *
walk_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data, steps, fast;
    Py_ssize_t pos, stop, count = 0;
    PyObject *result = NULL;

    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "walk_frames(data, pos, stop, steps, fast) takes 5 arguments");
        return NULL;
    }
    pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    stop = PyLong_AsSsize_t(args[2]);
    if (stop == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &steps, PyBUF_SIMPLE) < 0)
        goto release_data;
    if (PyObject_GetBuffer(args[4], &fast, PyBUF_SIMPLE) < 0)
        goto release_steps;
    if (steps.len != 256 || fast.len != 256) {
        PyErr_SetString(PyExc_ValueError, "steps and fast must be 256-byte tables");
        goto release_fast;
    }
    {
        const unsigned char *bytes = data.buf;
        const unsigned char *step_of = steps.buf;
        const unsigned char *is_fast = fast.buf;
        /* Every header looked at has its two bytes inside the buffer. */
        if (stop > data.len - 2)
            stop = data.len - 2;
        while (pos >= 0 && pos <= stop) {
            unsigned char step = step_of[bytes[pos + 1]];
            if (!step || !is_fast[bytes[pos]])
                break;
            pos += step;
            count++;
        }
    }
    result = Py_BuildValue("(nn)", pos, count);
release_fast:
    PyBuffer_Release(&fast);
release_steps:
    PyBuffer_Release(&steps);
release_data:
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef speedups_methods[] = {
    {"walk_frames", (PyCFunction)(void (*)(void))walk_frames, METH_FASTCALL,
     "walk_frames(data, pos, stop, steps, fast) -> (pos, count): the scanner's fast path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "wsgate._speedups", NULL, 0, speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&speedups_module);
}
