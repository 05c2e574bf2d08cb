/* snapimg._datapath: the module (see datapath.h for its parts). */
#include "datapath.h"

PyObject *ArrayType;
PyObject *ErrDevice;
PyObject *ErrOutOfRange;
PyObject *ErrReadOnly;
PyObject *ExtentType;

static PyObject *attr_of(const char *module, const char *name)
{
    PyObject *m = PyImport_ImportModule(module);
    if (!m)
        return NULL;
    PyObject *v = PyObject_GetAttrString(m, name);
    Py_DECREF(m);
    return v;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "snapimg._datapath",
    .m_doc = "The compiled copy-before-write data path (see snapimg.engine.compiled).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__datapath(void)
{
    if (PyType_Ready(&TableType) || PyType_Ready(&BarrierType) || PyType_Ready(&CoreType) ||
        PyType_Ready(&DeviceType) || PyType_Ready(&SlotsType))
        return NULL;
    if (!ArrayType) {
        ArrayType = attr_of("array", "array");
        ErrDevice = attr_of("snapimg.errors", "DeviceError");
        ErrOutOfRange = attr_of("snapimg.errors", "OutOfRangeError");
        ErrReadOnly = attr_of("snapimg.errors", "ReadOnlyError");
        ExtentType = attr_of("snapimg.blockdev", "Extent");
        if (!ArrayType || !ErrDevice || !ErrOutOfRange || !ErrReadOnly || !ExtentType)
            return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Table", (PyObject *)&TableType) ||
        PyModule_AddObjectRef(m, "Barrier", (PyObject *)&BarrierType) ||
        PyModule_AddObjectRef(m, "Core", (PyObject *)&CoreType) ||
        PyModule_AddObjectRef(m, "Device", (PyObject *)&DeviceType) ||
        PyModule_AddObjectRef(m, "Slots", (PyObject *)&SlotsType)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
